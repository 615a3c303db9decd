"""Learning-rate schedules as factories: `schedule(optimizer, total_steps)` -> Lightning's scheduler config
({"scheduler": ..., "interval": "epoch" or "step"}). A config's scheduler group is one of them, `_partial_`,
so the LightningModule calls it with the optimiser and the run's number of optimiser steps."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, MultiStepLR


class ZarembaDecay:
    """Zaremba's main.lua schedule as a LambdaLR factor: after each epoch e (1-based) with e > max_epoch
    the learning rate is divided by `decay`, so the 0-based epoch E trains at lr / decay**max(0, E - max_epoch)."""

    def __init__(self, max_epoch: int = 4, decay: float = 2.0):
        self.max_epoch, self.decay = max_epoch, decay

    def __call__(self, epoch: int) -> float:
        return self.decay ** -max(0, epoch - self.max_epoch)


class OneCycle:
    """OneCycleLR's shape as a LambdaLR factor whose length can change while the run goes: a linear warm-up
    from 1/div_factor to 1 over the first pct_start of total_steps, then a linear or cosine anneal to
    1/(div_factor * final_div_factor) at the last step, and there after. torch's OneCycleLR fixes its length
    when it is made; this one's `total_steps` is set anew (set_length) as a run with a time budget learns how
    many steps fit in it. LambdaLR saves the factor's attributes with its state, so a resumed run keeps them."""

    def __init__(self, total_steps: int, pct_start: float = 0.1, div_factor: float = 10,
                 final_div_factor: float = 100, anneal_strategy: str = "linear"):
        self.total_steps, self.pct_start, self.anneal = total_steps, pct_start, anneal_strategy
        self.start, self.end = 1 / div_factor, 1 / (div_factor * final_div_factor)

    def __call__(self, step: int) -> float:
        """The factor at `step`, phase by phase as torch's OneCycleLR (three_phase off) computes it."""
        warm_end = self.pct_start * self.total_steps - 1
        if step <= warm_end:
            t, a, b = step / warm_end if warm_end > 0 else 1.0, self.start, 1.0
        else:
            t, a, b = (step - warm_end) / (self.total_steps - 1 - warm_end), 1.0, self.end
        t = min(t, 1.0)
        if self.anneal == "linear":
            return a + (b - a) * t
        return b + (a - b) * (1 + math.cos(math.pi * t)) / 2


def zaremba(optimizer: Optimizer, total_steps: int, max_epoch: int = 4, decay: float = 2.0) -> dict:
    """Zaremba's decay, stepped after every epoch."""
    return {"scheduler": LambdaLR(optimizer, ZarembaDecay(max_epoch, decay)), "interval": "epoch"}


def multistep(optimizer: Optimizer, total_steps: int, milestones: list[int], gamma: float = 0.1) -> dict:
    """lr times gamma after each epoch in milestones (awd-lstm-lm's --when)."""
    return {"scheduler": MultiStepLR(optimizer, list(milestones), gamma), "interval": "epoch"}


def one_cycle(optimizer: Optimizer, total_steps: int, pct_start: float = 0.1, div_factor: float = 10,
              final_div_factor: float = 100, anneal_strategy: str = "cos") -> dict:
    """One cycle (OneCycleLR's shape, peaking at the optimiser's lr) over the run's steps, stepped every step;
    a time budget may change its length as the run goes."""
    factor = OneCycle(total_steps, pct_start, div_factor, final_div_factor, anneal_strategy)
    return {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}


def set_length(scheduler, total_steps: int) -> bool:
    """Lay `scheduler` over `total_steps` optimiser steps if its length can change (one_cycle's), the next step
    already at the new schedule's rate; whether it could."""
    factors = [f for f in getattr(scheduler, "lr_lambdas", []) if isinstance(f, OneCycle)]
    for factor in factors:
        factor.total_steps = total_steps
    if factors:  # LambdaLR would apply the new length from its next step() on: one step late
        for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
    return bool(factors)
