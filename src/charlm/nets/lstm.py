"""The course's network, and the regularisers of AWD-LSTM (Merity et al. 2018) as options, each off by default:
lookup table, dropout, stacked LSTM with dropout between and after, linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from charlm.nets.cells import stepped
from charlm.nets.dropout import StackDropout

# The carried state: every layer's h and every layer's c, each (1, batch, its width); layers may differ in width.
State = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]


class LSTMLM(StackDropout, nn.Module):
    """embedding(V->E) -> dropout -> LSTM x num_layers (dropout between) -> dropout -> linear(->V) logits.

    The layers are one-layer nn.LSTMs, each on the fused cuDNN or oneDNN kernel, so that what happens between
    them is the project's own: the dropout masks of a whole step drawn at once, and AWD-LSTM's options.

    - `dropout`: the course's one rate, at the input, between the layers and at the output;
      `dropout_input`, `dropout_hidden`, `dropout_output` set one place each (None: `dropout`).
    - `locked_dropout`: one mask per sequence, shared by all time steps of a window (variational dropout).
    - `dropout_embedding`: whole symbols dropped from the embedding table, one draw per window.
    - `weight_drop`: DropConnect on each layer's hidden-to-hidden matrix, one mask per window; the dropped
      matrix goes into the same fused kernel (torch.func.functional_call, no patched module).
    - `embedding_size`: the embedding's width apart from the hidden size; `tie_weights`: the decoder uses the
      embedding's matrix, the last layer sized to match, as AWD-LSTM does.
    Nothing is dropped in evaluation.
    """

    def __init__(self, vocab_size: int, hidden_size: int = 200, num_layers: int = 2,
                 dropout: float = 0.2, init_range: float = 0.1, dropout_input: float | None = None,
                 dropout_hidden: float | None = None, dropout_output: float | None = None,
                 locked_dropout: bool = False, dropout_embedding: float = 0.0, weight_drop: float = 0.0,
                 embedding_size: int | None = None, tie_weights: bool = False):
        super().__init__()
        self._dropout_options(dropout, dropout_input, dropout_hidden, dropout_output, locked_dropout,
                              dropout_embedding, weight_drop)
        self._build_stack(vocab_size, hidden_size, num_layers, init_range, embedding_size, tie_weights, "lstm", nn.LSTM)
        self.register_load_state_dict_pre_hook(_from_one_multilayer_lstm)

    def forward(self, x: torch.Tensor, state: State | None = None,
                outputs: bool = False) -> tuple[torch.Tensor, State] | tuple[torch.Tensor, State, tuple]:
        """x: (batch, time) symbol ids -> logits (batch, time, vocab) and the state after the last step; with
        `outputs`, also the last layer's output before and after its dropout (time-major), for AR and TAR.

        Inside, the network runs time-major from the embedding on, as the fused LSTM kernels lay their data
        out (about 5% faster on CPU than batch_first, which copies on the way in and out).
        """
        x = x.t()
        masks = self._masks(x.shape) if self.training else {}
        x = self._embedded(x, masks)
        hs, cs = [], []
        for k, layer in enumerate(self.lstm):
            if k in masks:
                x = x * masks[k].to(x.dtype)  # bf16 under autocast
            hx = None if state is None else (state[0][k], state[1][k])
            if ("weight", k) in masks:
                dropped = {"weight_hh_l0": layer.weight_hh_l0 * masks["weight", k]}
                x, (h, c) = functional_call(layer, dropped, (x, hx))
            else:
                x, (h, c) = layer(x, hx)
            hs.append(h)
            cs.append(c)
        return self._decoded(x, masks, (tuple(hs), tuple(cs)), outputs)

    def step(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """One symbol per row, without dropout: ids (batch,) -> logits (batch, vocab) and the new state.

        Why not forward on one step: nn.LSTM's call costs ~0.5 ms on CPU whatever the length; the same
        weights through torch.lstm_cell take a third of that, which is what a symbol-by-symbol query pays."""
        x = F.embedding(ids, self.embed.weight)
        hs, cs = [], []
        for k, layer in enumerate(self.lstm):
            hx = (torch.zeros(ids.size(0), layer.hidden_size, dtype=x.dtype, device=x.device),) * 2 \
                if state is None else (state[0][k][0], state[1][k][0])
            h, c = torch.lstm_cell(x, hx, *layer.all_weights[0])
            hs.append(h[None])
            cs.append(c[None])
            x = h
        return self.decoder(x), (tuple(hs), tuple(cs))

    def cell_states(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State, torch.Tensor]:
        """forward in eval mode, with every layer's cell state after each step: (batch, time, units)."""
        return stepped(self, x, state, lambda s: s[1])

    def _masks(self, steps_batch: torch.Size) -> dict:
        """A training step's masks (StackDropout): layer inputs, output, embedding, hidden-to-hidden weights."""
        widths = [layer.input_size for layer in self.lstm] + [self.lstm[-1].hidden_size]
        return self._stack_masks(steps_batch, widths, [layer.weight_hh_l0 for layer in self.lstm])


def _from_one_multilayer_lstm(module, state_dict, prefix, *args) -> None:
    """Checkpoints written when the layers were one nn.LSTM (`lstm.weight_ih_l1`) load as `lstm.1.weight_ih_l0`."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}lstm.") and k.count(".") == prefix.count(".") + 1]:
        name, layer = key[len(prefix) + 5:].rsplit("_l", 1)
        state_dict[f"{prefix}lstm.{layer}.{name}_l0"] = state_dict.pop(key)

