"""A GRU in LSTMLM's place: the same options and dropout places, another kind of layer and of state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from charlm.nets.dropout import StackDropout

# The carried state: every layer's h, (1, batch, its width). One tensor per layer, where LSTMLM carries a pair.
State = tuple[torch.Tensor, ...]


class GRULM(StackDropout, nn.Module):
    """embedding(V->E) -> dropout -> GRU x num_layers (dropout between) -> dropout -> linear(->V) logits.

    LSTMLM with each layer a one-layer nn.GRU on the fused kernel; the options are LSTMLM's and mean the same
    (`weight_drop` drops each layer's hidden-to-hidden matrix, all three gates' rows).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 200, num_layers: int = 2,
                 dropout: float = 0.2, init_range: float = 0.1, dropout_input: float | None = None,
                 dropout_hidden: float | None = None, dropout_output: float | None = None,
                 locked_dropout: bool = False, dropout_embedding: float = 0.0, weight_drop: float = 0.0,
                 embedding_size: int | None = None, tie_weights: bool = False):
        super().__init__()
        self._dropout_options(dropout, dropout_input, dropout_hidden, dropout_output, locked_dropout,
                              dropout_embedding, weight_drop)
        self._build_stack(vocab_size, hidden_size, num_layers, init_range, embedding_size, tie_weights, "gru", nn.GRU)

    def forward(self, x: torch.Tensor, state: State | None = None,
                outputs: bool = False) -> tuple[torch.Tensor, State] | tuple[torch.Tensor, State, tuple]:
        """x: (batch, time) symbol ids -> logits (batch, time, vocab) and the state after the last step; with
        `outputs`, also the last layer's output before and after its dropout (time-major)."""
        x = x.t()
        masks = self._masks(x.shape) if self.training else {}
        x = self._embedded(x, masks)
        hs = []
        for k, layer in enumerate(self.gru):
            if k in masks:
                x = x * masks[k].to(x.dtype)
            h0 = None if state is None else state[k]
            if ("weight", k) in masks:
                x, h = functional_call(layer, {"weight_hh_l0": layer.weight_hh_l0 * masks["weight", k]}, (x, h0))
            else:
                x, h = layer(x, h0)
            hs.append(h)
        return self._decoded(x, masks, tuple(hs), outputs)

    def step(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """One symbol per row, without dropout: ids (batch,) -> logits (batch, vocab) and the new state, through
        torch.gru_cell (a third of nn.GRU's per-call cost on CPU, as LSTMLM.step)."""
        x = F.embedding(ids, self.embed.weight)
        hs = []
        for k, layer in enumerate(self.gru):
            h = x.new_zeros(ids.size(0), layer.hidden_size) if state is None else state[k][0]
            x = torch.gru_cell(x, h, *layer.all_weights[0])
            hs.append(x[None])
        return self.decoder(x), tuple(hs)

    def _masks(self, steps_batch: torch.Size) -> dict:
        """A training step's masks (StackDropout): layer inputs, output, embedding, hidden-to-hidden weights."""
        widths = [layer.input_size for layer in self.gru] + [self.gru[-1].hidden_size]
        return self._stack_masks(steps_batch, widths, [layer.weight_hh_l0 for layer in self.gru])
