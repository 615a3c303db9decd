"""The course's network: lookup table, dropout, stacked LSTM with dropout between and after, linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]

MASK_LEVELS = 1 << 16  # a CPU dropout mask element is 16 random bits


def dropout_masks(x: torch.Tensor, p: float, count: int = 1) -> torch.Tensor:
    """`count` inverted-dropout masks for tensors like x, stacked (count, *x.shape), for CPU. Each element
    takes 16 random bits, four elements per 64-bit draw of torch's generator, where F.dropout's bernoulli_
    draws one an element: 2-3x faster, and at the course's size F.dropout's three calls were a tenth of a
    training step. All `count` masks come from one draw (a step's three masks: 180 us against 240 us as
    three calls), the same bits, in the same order, as `count` calls of `dropout`. p is rounded to a
    multiple of 1/65536 (0.2 -> 0.200003) and the kept values are scaled by the inverse of the rounded
    keep rate, so the expected output is still x."""
    drop = round(p * MASK_LEVELS)
    n = count * x.numel()
    # from int64's lowest value with no upper bound, random_ draws all 64 bits: four uniform int16s
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None).view(torch.int16)
    keep = bits[:n].view(count, *x.shape) >= drop - MASK_LEVELS // 2
    return keep.to(x.dtype).mul_(MASK_LEVELS / (MASK_LEVELS - drop))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout, as F.dropout, with a `dropout_masks` mask on CPU."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return x * dropout_masks(x, p)[0]


class LSTMLM(nn.Module):
    """embedding(V->H) -> dropout -> LSTM x num_layers (dropout between) -> dropout -> linear(H->V) logits."""

    def __init__(self, vocab_size: int, hidden_size: int = 200, num_layers: int = 2,
                 dropout: float = 0.2, init_range: float = 0.1):
        super().__init__()
        self.dropout_p = dropout
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        for p in self.parameters():  # Zaremba: every parameter uniform in [-init_range, init_range]
            nn.init.uniform_(p, -init_range, init_range)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (batch, time) symbol ids -> logits (batch, time, vocab) and the state after the last step.

        Inside, the network runs time-major from the embedding on, as the fused LSTM kernels lay their data
        out (about 5% faster on CPU than batch_first, which copies on the way in and out). Training on CPU,
        the dropout masks are `dropout_masks`, all of a step's in one draw, and the LSTM runs one layer at a
        time with its mask between (the same parameters, the same fused kernel per layer): nn.LSTM would
        draw the masks between its layers with bernoulli_. Elsewhere F.dropout and nn.LSTM's own.
        """
        x = self.embed(x.t())
        p = self.dropout_p
        if not (self.training and p > 0 and x.device.type == "cpu"):
            out, state = self.lstm(F.dropout(x, p, self.training), state)
            return self.decoder(F.dropout(out, p, self.training)).transpose(0, 1), state
        masks = dropout_masks(x, p, self.lstm.num_layers + 1)  # the embedding's, between the layers, the output's
        out, state = self._layers(x, state, masks)
        return self.decoder(out * masks[-1].to(out.dtype)).transpose(0, 1), state  # bf16 under autocast

    def _layers(self, x: torch.Tensor, state: State | None, masks: torch.Tensor) -> tuple[torch.Tensor, State]:
        """nn.LSTM's layers one at a time, each layer's input times its mask."""
        lstm = self.lstm
        if state is None:
            zeros = x.new_zeros(lstm.num_layers, x.size(1), lstm.hidden_size)
            state = (zeros, zeros)
        hs, cs = [], []
        for layer, weights in enumerate(lstm.all_weights):
            hx = (state[0][layer:layer + 1], state[1][layer:layer + 1])
            x, h, c = torch.lstm(x * masks[layer].to(x.dtype), hx, weights, has_biases=True, num_layers=1,
                                 dropout=0.0, train=True, bidirectional=False, batch_first=False)
            hs.append(h)
            cs.append(c)
        return x, (torch.cat(hs), torch.cat(cs))


def detach(state: State | None) -> State | None:
    """Keep the values of a carried state but stop gradients at the window boundary (truncated BPTT)."""
    return None if state is None else (state[0].detach(), state[1].detach())
