"""Vocabulary, the batched stream layout of truncated BPTT, and the LightningDataModules over PTB and any text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset

from charlm import cache as token_cache
from charlm import ptb
from charlm.errors import CharlmError
from charlm.files import read_text
from charlm.symbols import KINDS, Symbols


class Vocab:
    """Symbols numbered in order of first appearance in the training text (the course grader's order)."""

    def __init__(self, symbols: list[str]):
        self.symbols = list(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        if len(self.index) != len(self.symbols):
            raise CharlmError("vocabulary has repeated symbols; the vocab file or checkpoint is corrupt")

    @classmethod
    def from_tokens(cls, tokens: list[str]) -> Vocab:
        return cls(list(dict.fromkeys(tokens)))

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.symbols == other.symbols

    def encode(self, tokens: list[str], where: str = "text") -> torch.Tensor:
        """Map symbols to ids; a symbol outside the vocabulary is an error naming it and its position."""
        try:
            return torch.tensor([self.index[t] for t in tokens], dtype=torch.long)
        except KeyError as e:
            pos = tokens.index(e.args[0])
            raise CharlmError(f"{where} holds the symbol {e.args[0]!r} (token {pos}) that the training "
                              f"vocabulary lacks; use text made of the {len(self)} training symbols") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.symbols, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")


def limited(batches: int, limit: int | float) -> int:
    """A loader's batches as a trainer's limit_*_batches leaves them: a count, or a share of them."""
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Lay a 1-D token stream out as `batch_size` rows; row k is the k-th contiguous slice of the text."""
    n = ids.numel() // batch_size
    if n < 2:
        raise CharlmError(f"{ids.numel()} tokens are too few for batch size {batch_size}; "
                          f"lower data.batch_size or use a longer text")
    return ids[: n * batch_size].view(batch_size, n)


class BPTTWindows(Dataset):
    """Consecutive (input, target) windows over batched streams, target = input shifted by one step.

    Window i+1 starts where window i ended in every row, so the hidden state carried from one window is
    the right start for the next. `rows` picks a contiguous subset of streams (one rank's shard).

    With `variable_length`, each epoch's windows have lengths drawn as AWD-LSTM draws them (seq_len with
    probability 0.95, else seq_len / 2, plus normal noise of 5 steps, at least 5 and at most seq_len + 40),
    from a generator seeded by `seed` and the epoch (`set_epoch`), so a resumed run gets the same windows.
    The lengths are then scaled to cover the split exactly in as many windows as fixed ones would take, so
    an epoch always has the same number of steps (the schedules count on it).
    """

    def __init__(self, streams: torch.Tensor, seq_len: int, rows: slice = slice(None),
                 variable_length: bool = False, seed: int = 0):
        # kept time-major, (steps, streams), as the network reads them: a window is one contiguous block,
        # handed out as a (batch, time) view of it
        self.steps = streams[rows].t().contiguous()
        self.seq_len, self.variable_length, self.seed = seq_len, variable_length, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """The window boundaries of `epoch` (0-based): every `seq_len` steps, or drawn (variable_length)."""
        n = self.steps.size(0) - 1
        count = -(-n // self.seq_len)
        if not self.variable_length:
            self.ends = torch.arange(1, count + 1) * self.seq_len
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            base = torch.where(torch.rand(count, generator=gen) < 0.95, self.seq_len, self.seq_len / 2)
            lengths = (base + 5 * torch.randn(count, generator=gen)).long()
            lengths = lengths.clamp(min(5, self.seq_len), self.seq_len + 40).double()
            self.ends = (lengths.cumsum(0) * (n / lengths.sum())).round().long()
        self.ends = self.ends.clamp(max=n).tolist()

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = (self.ends[i - 1] if i else 0), self.ends[i]
        return self.steps[start:end].t(), self.steps[start + 1 : end + 1].t()


class WindowLoader:
    """Iterates the windows in order, each pass (epoch) from the first, except the first pass after
    `load_state_dict`: a checkpoint taken mid-epoch resumes at the next window of the same epoch (Lightning
    saves and restores iterables that have `state_dict`)."""

    def __init__(self, windows: BPTTWindows):
        self.windows, self.position, self.resume_at, self.epoch = windows, 0, 0, 0

    def __len__(self) -> int:
        return len(self.windows)

    def __iter__(self):
        start, self.resume_at = self.resume_at, 0
        self.windows.set_epoch(self.epoch)
        for i in range(start, len(self.windows)):
            self.position = i + 1
            yield self.windows[i]
        self.position = 0
        self.epoch += 1

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at, self.epoch = int(state["position"]), int(state.get("epoch", 0))


class StreamDataModule(L.LightningDataModule):
    """Three token streams (train, valid, test) as batched BPTT windows, in order, never shuffled.

    The one loader of the project: subclasses only say how to read the streams (`load`) and what kind of
    symbol they hold (`kind`, charlm.symbols: how text becomes symbols and which figures judge a model). The test split may be
    read with its own number of streams (`test_batch_size`; Zaremba's main.lua scores test as one stream).
    `variable_length` draws the training windows' lengths around seq_len (BPTTWindows), from the run's seed.
    """

    kind: Symbols = KINDS["char"]

    def __init__(self, seq_len: int = 10, batch_size: int = 20, eval_batch_size: int = 10,
                 test_batch_size: int | None = None, variable_length: bool = False):
        super().__init__()
        self.seq_len, self.batch_size, self.eval_batch_size = seq_len, batch_size, eval_batch_size
        self.variable_length = variable_length
        self.test_batch_size = test_batch_size or eval_batch_size
        self.vocab: Vocab | None = None
        self.ids: dict[str, torch.Tensor] = {}

    def load(self) -> tuple[Vocab, dict[str, torch.Tensor]]:
        """The vocabulary and the id stream of each split in SPLITS."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.ids:
            self.vocab, self.ids = self.load()
            self.check_sizes()

    def check_sizes(self) -> None:
        """Every split holds at least two symbols per stream: checked as soon as the data is read, before a
        model is built."""
        for split, key in (("train", "batch_size"), ("valid", "eval_batch_size"), ("test", "test_batch_size")):
            symbols, streams = self.ids[split].numel(), getattr(self, key)
            if symbols // streams < 2:
                raise CharlmError(f"data.{key}={streams} is too large: the {split} split's {symbols} symbols make "
                                  f"fewer than 2 per stream; set data.{key} to at most {symbols // 2}")

    def _rows(self, batch_size: int) -> slice:
        """This rank's contiguous share of the streams (all of them on one process)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if batch_size % world:
            raise CharlmError(f"batch size {batch_size} does not divide over {world} processes; "
                              f"make data.batch_size and data.eval_batch_size multiples of {world}")
        share = batch_size // world
        return slice(rank * share, (rank + 1) * share)

    def _loader(self, split: str, batch_size: int, variable_length: bool = False) -> WindowLoader:
        streams = batchify(self.ids[split], batch_size)
        # torch.initial_seed() is the run's seed (seed_everything), in this process and in a resumed one
        return WindowLoader(BPTTWindows(streams, self.seq_len, self._rows(batch_size), variable_length,
                                        torch.initial_seed()))

    def train_dataloader(self) -> WindowLoader:
        return self._loader("train", self.batch_size, self.variable_length)

    def val_dataloader(self) -> WindowLoader:
        return self._loader("valid", self.eval_batch_size)

    def test_dataloader(self) -> WindowLoader:
        return self._loader("test", self.test_batch_size)


def read_splits(paths: dict[str, Path]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Read each split by the course's rule; the vocabulary is the training split's symbols in order."""
    tokens = {s: ptb.read_tokens(path) for s, path in paths.items()}
    vocab = Vocab.from_tokens(tokens["train"])
    return vocab.symbols, {s: vocab.encode(t, where=str(paths[s])) for s, t in tokens.items()}


class PTBDataModule(StreamDataModule):
    """PTB at character or word level, read by the course's rule; the vocabulary comes from the training split."""

    def __init__(self, data_dir: str, level: str = "char", seq_len: int = 10, batch_size: int = 20,
                 eval_batch_size: int = 10, test_batch_size: int | None = None, download: bool = True,
                 url: str = ptb.WORD_URL, verify: bool = True, cache: bool = True, variable_length: bool = False):
        super().__init__(seq_len, batch_size, eval_batch_size, test_batch_size, variable_length)
        self.data_dir = Path(os.path.expanduser(str(data_dir)))
        self.level, self.url, self.download, self.verify, self.cache = level, url, download, verify, cache
        if level not in ("char", "word"):
            raise CharlmError(f"data.level={level!r} is not allowed: it must be char or word")
        self.kind = KINDS[level]

    def prepare_data(self) -> None:
        if self.download:
            ptb.ensure_files(self.data_dir, self.level, self.url)

    def load(self) -> tuple[Vocab, dict[str, torch.Tensor]]:
        paths = {s: self.data_dir / ptb.filename(self.level, s) for s in ptb.SPLITS}
        # one MD5 pass over the files serves both the checksum check and the cache's key
        digests = {s: ptb.md5sum(p) for s, p in paths.items() if p.is_file()} if self.verify or self.cache else {}
        if self.verify:
            ptb.verify(self.data_dir, {paths[s].name: d for s, d in digests.items()})
        if self.cache:  # the tokenised splits, read from the text files only when they changed
            symbols, ids = token_cache.load_or_build(paths, self.data_dir, self.level, lambda: read_splits(paths),
                                                     digests)
        else:
            symbols, ids = read_splits(paths)
        return Vocab(symbols), ids


class TextDataModule(StreamDataModule):
    """Any UTF-8 text at character level: every character, spaces and newlines included, is a symbol.

    The text is cut into three contiguous parts, train first, then valid, then test (the last
    `valid_fraction` and `test_fraction` of its characters). The vocabulary is the training part's
    characters in order of first appearance. A character of valid or test that training never saw is
    handled by `unknown`: "unk" reads it as UNK, a symbol reserved at the end of the vocabulary (never
    seen in training, so the model learns to give it little probability and the loss counts that);
    "error" stops with the character and its offset in the file.
    """

    kind = KINDS["text"]
    UNK = "<unk>"  # several characters long, so no character of any text can be it

    def __init__(self, path: str, valid_fraction: float = 0.05, test_fraction: float = 0.05,
                 unknown: str = "unk", seq_len: int = 100, batch_size: int = 20, eval_batch_size: int = 10,
                 test_batch_size: int | None = None, variable_length: bool = False):
        super().__init__(seq_len, batch_size, eval_batch_size, test_batch_size, variable_length)
        self.path = Path(os.path.expanduser(str(path)))
        self.valid_fraction, self.test_fraction, self.unknown = valid_fraction, test_fraction, unknown

    def read_text(self) -> str:
        """The file's exact characters (no newline translation)."""
        return read_text(self.path, f"data.path={self.path}", "set data.path to a UTF-8 text file",
                         empty="set data.path to a text to train on")

    def split(self, text: str) -> dict[str, tuple[int, str]]:
        """Each split's offset in the text and its characters: train, valid, test, contiguous and in order."""
        if self.valid_fraction + self.test_fraction >= 1:
            raise CharlmError(f"data.valid_fraction + data.test_fraction = "
                              f"{self.valid_fraction + self.test_fraction} leaves no training text; "
                              f"make their sum < 1")
        n = len(text)
        ends = {"train": round(n * (1 - self.valid_fraction - self.test_fraction)),
                "valid": round(n * (1 - self.test_fraction)), "test": n}
        starts = {"train": 0, "valid": ends["train"], "test": ends["valid"]}
        return {s: (starts[s], text[starts[s]:ends[s]]) for s in ptb.SPLITS}

    def load(self) -> tuple[Vocab, dict[str, torch.Tensor]]:
        parts = self.split(self.read_text())
        vocab = Vocab(list(dict.fromkeys(parts["train"][1])) + ([self.UNK] if self.unknown == "unk" else []))
        ids = {}
        for s, (offset, chars) in parts.items():
            unseen = next((i for i, c in enumerate(chars) if c not in vocab.index), None)
            if unseen is not None and self.unknown != "unk":
                raise CharlmError(f"the {s} part of {self.path} holds {chars[unseen]!r} (character "
                                  f"{offset + unseen} of the file) that the training part lacks; set "
                                  f"data.unknown=unk to read such characters as {self.UNK}, or change "
                                  f"data.valid_fraction/data.test_fraction")
            ids[s] = vocab.encode([c if c in vocab.index else self.UNK for c in chars], where=f"{s} part")
        return vocab, ids
