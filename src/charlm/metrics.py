"""Every figure the project reports derives from one number: the mean NLL per symbol, in nats (TokenNLL);
which figures those are is the data's kind of symbol's to say (charlm.symbols)."""

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from charlm.symbols import Symbols


class TokenNLL(Metric):
    """Mean NLL per predicted symbol over a whole split: each window's mean weighted by its symbols, summed
    in float64, summed across ranks. (torchmetrics' MeanMetric either syncs the host every step for its NaN
    check or, with nan_strategy="disable", silently drops the weights.)"""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean_nll: torch.Tensor, symbols: int) -> None:
        self.total.add_(mean_nll.detach().double(), alpha=symbols)  # in place: no Module.__setattr__ a step
        self.count.add_(symbols)

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class PositionBits(Metric):
    """Where the bits go: the bits of predicted symbols summed by kind of position (`symbols.positions`,
    e.g. the first character of a word against the rest), in float64, summed across ranks.

    A symbol's kind of position depends on it and on whether the symbol before it ends a word, so the lookup
    is a (vocabulary, 2) table: an index and an index_add a window, nothing per symbol in Python."""

    full_state_update = False

    def __init__(self, symbols: Symbols, vocab: Sequence[str]) -> None:
        super().__init__()
        self.names = symbols.positions
        breaks = (symbols.space, symbols.start)
        word = next(s for s in vocab if s not in breaks)  # any symbol that does not end a word
        self.register_buffer("kinds", torch.tensor([[self.names.index(symbols.position(before, s)) for before in (word, symbols.start)]
                                                    for s in vocab]), persistent=False)
        self.register_buffer("after_break", torch.tensor([s in breaks for s in vocab], dtype=torch.long), persistent=False)
        self.add_state("bits", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, y: torch.Tensor, nll: torch.Tensor) -> None:
        """x, y: (batch, time) input and target ids; nll: (batch, time) NLL of each target, in nats."""
        kinds = self.kinds[y, self.after_break[x]].flatten()
        self.bits.index_add_(0, kinds, nll.detach().flatten().double(), alpha=1 / math.log(2))
        self.count.index_add_(0, kinds, torch.ones_like(kinds, dtype=torch.float64))

    def compute(self) -> list[dict]:
        """One row per kind of position that occurred: its symbols, their share, mean bits, share of all bits."""
        total_bits, total = float(self.bits.sum()), float(self.count.sum())
        return [{"position": name, "symbols": int(n), "share": n / total, "mean_bits": b / n, "share_of_bits": b / total_bits}
                for name, b, n in zip(self.names, self.bits.tolist(), self.count.tolist()) if n]


POSITION_COLUMNS = ("position", "symbols", "share", "mean bits", "share of bits")


def position_cells(rows: list[dict]) -> list[list[str]]:
    """The where-the-bits-go rows as the text of a table's cells, under POSITION_COLUMNS."""
    return [[r["position"], f"{r['symbols']:,}", f"{r['share']:.1%}", f"{r['mean_bits']:.3f}", f"{r['share_of_bits']:.1%}"]
            for r in rows]


def position_markdown(rows: list[dict]) -> str:
    """The where-the-bits-go rows as a Markdown table (TensorBoard's text tab, charlm.evaluate)."""
    lines = ["| " + " | ".join(POSITION_COLUMNS) + " |", "|---|---:|---:|---:|---:|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in position_cells(rows)])
