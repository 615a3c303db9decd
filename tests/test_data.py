"""The data pipeline: the course's reading rule, vocabulary order, and the BPTT window layout."""

import pytest
import torch

from charlm import ptb
from charlm.data import BPTTWindows, PTBDataModule, Vocab, batchify
from charlm.errors import CharlmError


def test_tokenize_turns_newlines_into_eos():
    assert ptb.tokenize("a b _ c \n d \n") == ["a", "b", "_", "c", "<eos>", "d", "<eos>"]


def test_char_files_derive_byte_exact_from_word_files():
    assert ptb.words_to_chars(" the cat \n a dog \n") == "t h e _ c a t \n a _ d o g \n "


def test_windows_are_shifted_by_one_and_continue_across_windows():
    ids = torch.arange(103)
    streams = batchify(ids, 4)  # 4 rows of 25 contiguous tokens
    assert streams.shape == (4, 25)
    assert torch.equal(streams[1], torch.arange(25, 50))  # row k is the k-th contiguous slice
    windows = BPTTWindows(streams, seq_len=7)
    xs, ys = zip(*(windows[i] for i in range(len(windows))))
    for x, y in zip(xs, ys):
        assert torch.equal(y, x + 1)  # the target is the next symbol
    for prev, nxt in zip(xs, xs[1:]):
        assert torch.equal(nxt[:, 0], prev[:, -1] + 1)  # window i+1 continues window i in every row
    # every symbol but the first of each row is predicted exactly once; the last window is partial
    assert sum(y.size(1) for y in ys) == 24 and ys[-1].size(1) == 24 - 7 * 3


def test_shard_rows_are_contiguous_subsets_of_the_streams():
    streams = batchify(torch.arange(80), 4)
    x, _ = BPTTWindows(streams, 5, rows=slice(2, 4))[0]
    assert torch.equal(x[:, 0], streams[2:4, 0])


def test_vocabulary_is_first_appearance_order_on_real_training_file(real_data):
    dm = PTBDataModule(real_data, download=False)
    dm.setup()
    assert len(dm.vocab) == 50
    assert dm.vocab.symbols[:4] == ["a", "e", "r", "_"]
    tokens = ptb.read_tokens(real_data / "ptb.char.train.txt")
    assert dm.vocab.symbols == list(dict.fromkeys(tokens))
    assert dm.ids["train"].numel() == 5_017_482 and dm.ids["valid"].numel() == 393_042


def test_unknown_symbol_is_named_with_its_position():
    vocab = Vocab(["a", "b"])
    with pytest.raises(CharlmError, match=r"'z' \(token 2\)"):
        vocab.encode(["a", "b", "z"], where="valid")


def test_too_little_text_for_the_batch_is_a_clear_error():
    with pytest.raises(CharlmError, match="too few"):
        batchify(torch.arange(5), 4)
