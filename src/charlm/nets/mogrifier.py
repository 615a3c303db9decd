"""The Mogrifier LSTM (Melis, Kočiský & Blunsom, "Mogrifier LSTM", ICLR 2020) with LSTMLM's options.

Before each LSTM step the input x and the previous output h gate one another for r rounds, x first:
    odd round i:  x <- 2 sigmoid(Q^i h + b^i) * x        even round i:  h <- 2 sigmoid(R^i x + b^i) * h
then an ordinary LSTM step on the gated x and h with the previous cell c. Each round has its own matrix, full
or of low rank (Q^i = Q^i_left Q^i_right); the factor 2 makes small random matrices gate close to identity;
r = 0 is the LSTM itself (torch's gate layout and torch.lstm_cell, so the same weights give nn.LSTM's numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm.nets.cells import stepped
from charlm.nets.dropout import StackDropout

# The carried state: every layer's h and every layer's c, each (1, batch, its width).
State = dict[str, tuple[torch.Tensor, ...]]


class MogrifierRound(nn.Module):
    """One round's matrix and bias, mapping the `source` vector to a gate over the `target` one: the matrix
    full (`weight`), or the product `left @ right` of rank `rank`. Left uninitialised: MogrifierLM draws them."""

    def __init__(self, source: int, target: int, rank: int):
        super().__init__()
        if rank:
            self.left = nn.Parameter(torch.empty(target, rank))
            self.right = nn.Parameter(torch.empty(rank, source))
        else:
            self.weight = nn.Parameter(torch.empty(target, source))
        self.bias = nn.Parameter(torch.empty(target))

    def factors(self) -> tuple[torch.Tensor, ...]:
        """What `gate` takes: the transposed factors, right first, then the bias. Two thin products a step
        beat one with Q composed once per window: 15% of a training step at 2x200, rank 16, on CPU."""
        if hasattr(self, "weight"):
            return self.weight.t(), self.bias
        return self.right.t(), self.left.t(), self.bias


def gate(source: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """2 sigmoid(Q source + b), source (batch, width), with the bias added inside the last product."""
    *first, last, bias = factors
    for f in first:
        source = source.mm(f)
    return 2 * torch.sigmoid(torch.addmm(bias, source, last))


def mogrify(x: torch.Tensor, h: torch.Tensor, rounds: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """x and h after the rounds: the 1st, 3rd, ... gate x by h, the 2nd, 4th, ... h by the latest x."""
    for i, factors in enumerate(rounds):
        if i % 2 == 0:
            x = gate(h, factors) * x
        else:
            h = gate(x, factors) * h
    return x, h


class MogrifierLSTMLayer(nn.Module):
    """One layer: nn.LSTMCell's parameters (gates i, f, g, o) and the rounds of the mogrifier before them,
    uninitialised (MogrifierLM draws them).

    The time loop is Python, as each step's input depends on the state: per step and round one addmm (after
    a thin product at low rank), a sigmoid and two products, then torch.lstm_cell; the transposed factors are
    taken once per window. torch.compile of the step was slower on CPU at 2x200 (and took seconds to compile).
    """

    def __init__(self, input_size: int, hidden_size: int, rounds: int, rank: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        self.rounds = nn.ModuleList(  # the 1st, 3rd, ... map h to a gate over x, the others x to one over h
            MogrifierRound(*((hidden_size, input_size) if i % 2 == 0 else (input_size, hidden_size)), rank)
            for i in range(rounds))

    def forward(self, xs: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                weight_hh: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xs (time, batch, input) from h, c (batch, hidden) -> outputs (time, batch, hidden), last h and c;
        `weight_hh` in place of the layer's own (weight drop)."""
        rounds = [r.factors() for r in self.rounds]
        weights = (self.weight_ih, self.weight_hh if weight_hh is None else weight_hh, self.bias_ih, self.bias_hh)
        out = []
        for x in xs.unbind(0):
            x, h_in = mogrify(x, h, rounds)
            h, c = torch.lstm_cell(x, (h_in, c), *weights)
            out.append(h)
        return torch.stack(out), h, c


class MogrifierLM(StackDropout, nn.Module):
    """embedding(V->E) -> dropout -> Mogrifier LSTM x num_layers (dropout between) -> dropout -> linear(->V).

    LSTMLM's options, meaning the same (`weight_drop` on each layer's weight_hh, not on the mogrifier's
    matrices), and `rounds` (r, 0: an LSTM) and `rank` (of each round's matrix, 0: full).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 200, num_layers: int = 2,
                 dropout: float = 0.2, init_range: float = 0.1, dropout_input: float | None = None,
                 dropout_hidden: float | None = None, dropout_output: float | None = None,
                 locked_dropout: bool = False, dropout_embedding: float = 0.0, weight_drop: float = 0.0,
                 embedding_size: int | None = None, tie_weights: bool = False, rounds: int = 4, rank: int = 16):
        super().__init__()
        self._dropout_options(dropout, dropout_input, dropout_hidden, dropout_output, locked_dropout,
                              dropout_embedding, weight_drop)
        self._build_stack(vocab_size, hidden_size, num_layers, init_range, embedding_size, tie_weights, "layers",
                          lambda source, target: MogrifierLSTMLayer(source, target, rounds, rank))

    def forward(self, x: torch.Tensor, state: State | None = None,
                outputs: bool = False) -> tuple[torch.Tensor, State] | tuple[torch.Tensor, State, tuple]:
        """x: (batch, time) symbol ids -> logits (batch, time, vocab) and the state after the last step; with
        `outputs`, also the last layer's output before and after its dropout (time-major)."""
        x = x.t()
        masks = self._masks(x.shape) if self.training else {}
        x = self._embedded(x, masks)
        hs, cs = [], []
        for k, layer in enumerate(self.layers):
            if k in masks:
                x = x * masks[k].to(x.dtype)
            h, c = self._layer_state(state, k, x)
            weight_hh = layer.weight_hh * masks["weight", k] if ("weight", k) in masks else None
            x, h, c = layer(x, h, c, weight_hh)
            hs.append(h[None])
            cs.append(c[None])
        return self._decoded(x, masks, {"h": tuple(hs), "c": tuple(cs)}, outputs)

    def step(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """One symbol per row, without dropout whatever the mode: ids (batch,) -> logits (batch, vocab) and the
        new state; forward's own layers on a one-step window, so the numbers are forward's."""
        x = F.embedding(ids[None], self.embed.weight)
        hs, cs = [], []
        for k, layer in enumerate(self.layers):
            x, h, c = layer(x, *self._layer_state(state, k, x))
            hs.append(h[None])
            cs.append(c[None])
        return self.decoder(x[0]), {"h": tuple(hs), "c": tuple(cs)}

    def cell_states(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State, torch.Tensor]:
        """forward in eval mode, with every layer's cell state after each step: (batch, time, units)."""
        return stepped(self, x, state, lambda s: s["c"])

    def _layer_state(self, state: State | None, k: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer k's h and c, (batch, width), zeros at the start."""
        if state is None:
            zeros = like.new_zeros(like.size(1), self.layers[k].hidden_size)
            return zeros, zeros
        return state["h"][k][0], state["c"][k][0]

    def _masks(self, steps_batch: torch.Size) -> dict:
        """A training step's masks (StackDropout): layer inputs, output, embedding, hidden-to-hidden weights."""
        widths = [layer.input_size for layer in self.layers] + [self.layers[-1].hidden_size]
        return self._stack_masks(steps_batch, widths, [layer.weight_hh for layer in self.layers])
