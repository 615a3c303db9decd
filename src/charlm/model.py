"""The course's network: lookup table, dropout, stacked LSTM with dropout between and after, linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]

MASK_LEVELS = 1 << 16  # a CPU dropout mask element is 16 random bits


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout, as F.dropout. On CPU the mask takes 16 random bits an element, four elements per
    64-bit draw of torch's generator, where F.dropout's bernoulli_ draws one an element: 2-3x faster,
    and at the course's size F.dropout's three calls were a tenth of a training step. p is rounded to a
    multiple of 1/65536 (0.2 -> 0.200003) and the kept values are scaled by the inverse of the rounded
    keep rate, so the expected output is still x."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    drop = round(p * MASK_LEVELS)
    n = x.numel()
    # from int64's lowest value with no upper bound, random_ draws all 64 bits: four uniform int16s
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None).view(torch.int16)
    keep = bits[:n].view(x.shape) >= drop - MASK_LEVELS // 2
    return x * keep.to(x.dtype).mul_(MASK_LEVELS / (MASK_LEVELS - drop))


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

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.dropout_p, self.training)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (batch, time) symbol ids -> logits (batch, time, vocab) and the state after the last step.

        Inside, the network runs time-major from the embedding on, as the fused LSTM kernels lay their data
        out (about 5% faster on CPU than batch_first, which copies on the way in and out).
        """
        out, state = self._lstm(self.drop(self.embed(x.t())), state)
        return self.decoder(self.drop(out)).transpose(0, 1), state

    def _lstm(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """nn.LSTM, except when it would draw dropout masks between layers on CPU: then one layer at a
        time, with this module's dropout between (the same parameters, the same fused kernel per layer)."""
        lstm = self.lstm
        if not (self.training and lstm.dropout > 0 and x.device.type == "cpu"):
            return lstm(x, state)
        if state is None:
            zeros = x.new_zeros(lstm.num_layers, x.size(1), lstm.hidden_size)
            state = (zeros, zeros)
        hs, cs = [], []
        for layer, weights in enumerate(lstm.all_weights):
            if layer:
                x = self.drop(x)
            x, h, c = torch.lstm(x, (state[0][layer:layer + 1], state[1][layer:layer + 1]), weights,
                                 has_biases=True, num_layers=1, dropout=0.0, train=True, bidirectional=False,
                                 batch_first=False)
            hs.append(h)
            cs.append(c)
        return x, (torch.cat(hs), torch.cat(cs))


def detach(state: State | None) -> State | None:
    """Keep the values of a carried state but stop gradients at the window boundary (truncated BPTT)."""
    return None if state is None else (state[0].detach(), state[1].detach())
