"""Vocabulary, the batched stream layout of truncated BPTT, and the LightningDataModule over PTB."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset

from charlm import ptb
from charlm.errors import CharlmError


class Vocab:
    """Symbols numbered in order of first appearance in the training text (the course grader's order)."""

    def __init__(self, symbols: list[str]):
        self.symbols = list(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        if len(self.index) != len(self.symbols):
            raise CharlmError("vocabulary has repeated symbols; the vocab file or checkpoint is corrupt")

    @classmethod
    def from_tokens(cls, tokens: list[str]) -> "Vocab":
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
    """

    def __init__(self, streams: torch.Tensor, seq_len: int, rows: slice = slice(None)):
        self.streams = streams[rows]
        self.seq_len = seq_len

    def __len__(self) -> int:
        return -(-(self.streams.size(1) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.seq_len
        end = min(start + self.seq_len, self.streams.size(1) - 1)
        return self.streams[:, start:end], self.streams[:, start + 1 : end + 1]


class WindowLoader:
    """Iterates the windows in order, each pass from the first, except the first pass after
    `load_state_dict`: a checkpoint taken mid-epoch resumes at the next window (Lightning saves and
    restores iterables that have `state_dict`)."""

    def __init__(self, windows: BPTTWindows):
        self.windows, self.position, self.resume_at = windows, 0, 0

    def __len__(self) -> int:
        return len(self.windows)

    def __iter__(self):
        start, self.resume_at = self.resume_at, 0
        for i in range(start, len(self.windows)):
            self.position = i + 1
            yield self.windows[i]
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = int(state["position"])


class PTBDataModule(L.LightningDataModule):
    """PTB as batched BPTT windows, in order, never shuffled; the vocabulary comes from the training split."""

    def __init__(self, data_dir: str, level: str = "char", seq_len: int = 10, batch_size: int = 20,
                 eval_batch_size: int = 10, download: bool = True, url: str = ptb.WORD_URL, verify: bool = True):
        super().__init__()
        self.data_dir = Path(os.path.expanduser(str(data_dir)))
        self.level, self.seq_len, self.url, self.download, self.verify = level, seq_len, url, download, verify
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.vocab: Vocab | None = None
        self.ids: dict[str, torch.Tensor] = {}

    def prepare_data(self) -> None:
        if self.download:
            ptb.ensure_files(self.data_dir, self.level, self.url)

    def setup(self, stage: str | None = None) -> None:
        if self.ids:
            return
        if self.verify:
            ptb.verify(self.data_dir, self.level)
        tokens = {s: ptb.read_tokens(self.data_dir / ptb.filename(self.level, s)) for s in ptb.SPLITS}
        self.vocab = Vocab.from_tokens(tokens["train"])
        self.ids = {s: self.vocab.encode(t, where=str(self.data_dir / ptb.filename(self.level, s)))
                    for s, t in tokens.items()}

    def _rows(self, batch_size: int) -> slice:
        """This rank's contiguous share of the streams (all of them on one process)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if batch_size % world:
            raise CharlmError(f"batch size {batch_size} does not divide over {world} processes; "
                              f"make data.batch_size and data.eval_batch_size multiples of {world}")
        share = batch_size // world
        return slice(rank * share, (rank + 1) * share)

    def _loader(self, split: str, batch_size: int) -> WindowLoader:
        return WindowLoader(BPTTWindows(batchify(self.ids[split], batch_size), self.seq_len, self._rows(batch_size)))

    def train_dataloader(self) -> WindowLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> WindowLoader:
        return self._loader("valid", self.eval_batch_size)

    def test_dataloader(self) -> WindowLoader:
        return self._loader("test", self.eval_batch_size)
