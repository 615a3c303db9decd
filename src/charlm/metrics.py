"""Every figure the project reports derives from one number: the mean NLL per symbol, in nats (TokenNLL).

Which figures are reported depends on the data level (what a symbol is), and is decided here only:
  char  PTB characters (the course): nll, bpc, per-character ppl, and the course's ppl56
  text  characters of any text:      nll, bpc, per-character ppl
  word  PTB words (Zaremba et al.):  nll, per-word ppl
"""

import math

import torch
from torchmetrics import Metric

# The course scored characters by the word-level perplexity they imply: 5.6 characters per PTB word.
CHARS_PER_WORD = 5.6
HEADLINE = {"char": "bpc", "text": "bpc", "word": "ppl"}  # the figure each level is judged by (lower is better)
UNIT = {"char": "chars", "text": "chars", "word": "words"}  # what a symbol is, for throughput names


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))


def from_nll(nll: float, level: str = "char") -> dict[str, float]:
    """NLL (nats per symbol) -> the figures reported for `level` (see the module docstring)."""
    if level == "word":
        return {"nll": nll, "ppl": _exp(nll)}
    values = {"nll": nll, "bpc": nll / math.log(2), "ppl": _exp(nll)}
    if level == "char":
        values["ppl56"] = _exp(CHARS_PER_WORD * nll)
    return values


def per_step(loss, level: str = "char") -> dict[str, object]:
    """The headline figure of one training window from its mean NLL tensor, without a device sync."""
    return {"ppl": loss.exp()} if HEADLINE[level] == "ppl" else {"bpc": loss / math.log(2)}


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
