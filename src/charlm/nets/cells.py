"""Per-step cell states, for `charlm.inspect`'s cell strips: the optional `cell_states` of the contract.

The fused multi-step kernels return only each layer's last cell state, so a network that offers its cells
runs its one-symbol `step` along the window instead: a few times slower than forward, and only the inspect
page pays it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def stepped(net, x: torch.Tensor, state: Any, cells_of: Callable[[Any], tuple[torch.Tensor, ...]]):
    """x (batch, time) ids -> logits (batch, time, vocab), the last state, and every layer's cell state after
    each step side by side, (batch, time, units), units numbered layer by layer. `cells_of(state)` is the
    network's per-layer cell states, each (1, batch, width)."""
    logits, cells = [], []
    for ids in x.unbind(1):
        step_logits, state = net.step(ids, state)
        logits.append(step_logits)
        cells.append(torch.cat(cells_of(state), -1)[0])
    return torch.stack(logits, 1), state, torch.stack(cells, 1)
