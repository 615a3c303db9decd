"""Every figure the project reports derives from one number: the mean NLL per symbol, in nats (TokenNLL);
which figures those are is the data's kind of symbol's to say (charlm.symbols)."""

import torch
from torchmetrics import Metric


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
