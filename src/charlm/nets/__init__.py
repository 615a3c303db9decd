"""The networks: plain torch modules that map symbol ids to next-symbol logits, carrying a state.

The contract a network meets, and all the rest of charlm assumes (docs/networks.md):

    net = Network(vocab_size, **options)
    logits, state = net(x, state=None)   # x: (batch, time) ids -> logits (batch, time, vocab_size)

`state` is whatever the network carries from one call to the next (a tensor, a tuple, a dict of tensors),
None at the start; charlm passes it back unchanged, detaches it at window boundaries, keeps it in
checkpoints and never looks inside. What more a network offers is optional, found by looking:
- `net.step(ids, state) -> (logits, state)`: one symbol per row, ids (batch,) -> logits (batch, vocab_size),
  in eval mode; charlm.load's one-symbol queries and sampling use it, else they call forward on one step;
- `forward(..., outputs=True)` returning a third item, the last layer's output before and after its dropout,
  (time, batch, width) each: what AWD-LSTM's activation regularisers (loss.ar_alpha, loss.tar_beta) need;
- `cell_states(x, state) -> (logits, state, cells)` in eval mode, cells (batch, time, units): every
  layer's cell state after each step, for charlm.inspect's cell strips (charlm.nets.cells);
- parameters named `embed.*` and `decoder.*` stay on AdamW under optimizer=muon; other matrices take Muon.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from charlm.errors import CharlmError
from charlm.nets.gru import GRULM
from charlm.nets.lstm import LSTMLM
from charlm.nets.mogrifier import MogrifierLM

__all__ = ["LSTMLM", "GRULM", "MogrifierLM", "build", "detach", "target_of", "takes_outputs"]


def detach(state: Any) -> Any:
    """The same state with every tensor detached (truncated BPTT's window boundary), whatever its nesting."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: detach(v) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a namedtuple
        return type(state)(*(detach(v) for v in state))
    if isinstance(state, (tuple, list)):
        return type(state)(detach(v) for v in state)
    return state


def target_of(cls: type) -> str:
    """The dotted path a config's `_target_` names `cls` by."""
    return f"{cls.__module__}.{cls.__qualname__}"


def locate(target: str) -> type:
    """The class a dotted path names, imported; a path that names none is one CharlmError."""
    module_name, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise CharlmError(f"cannot import the network {target!r} ({e}); put its module on PYTHONPATH") from None


def build(spec: dict, vocab_size: int) -> nn.Module:
    """A network from its description, as a checkpoint keeps it: {"_target_": dotted class path, **options}."""
    options = {k: v for k, v in spec.items() if k != "_target_"}
    return locate(spec["_target_"])(vocab_size, **options)


def takes_outputs(net: nn.Module) -> bool:
    """Whether the network's forward can also return its last layer's outputs (for AR and TAR)."""
    import inspect

    return "outputs" in inspect.signature(net.forward).parameters
