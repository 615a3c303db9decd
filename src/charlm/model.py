"""The course's network: lookup table, dropout, stacked LSTM with dropout between and after, linear."""

from __future__ import annotations

import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]

MASK_LEVELS = 1 << 16  # a dropout mask element is 16 random bits


def dropout_masks(x: torch.Tensor, p: float, count: int = 1) -> torch.Tensor:
    """`count` inverted-dropout masks shaped like x, stacked (count, *x.shape), in x's dtype and device.

    Why not F.dropout: its bernoulli_ draws one random number per element, where each element here takes
    16 bits, four elements per 64-bit draw of torch's generator, and all `count` masks come from one draw.
    On CPU that is 2-3x faster, and F.dropout's three calls were a tenth of a course training step
    (`python bench/throughput.py --tricks` measures it). The same bits in the same order as `count` calls
    with count=1. p is rounded to a multiple of 1/65536 (0.2 -> 0.200003) and the kept values are scaled by
    the inverse of the rounded keep rate, so the expected output is still x.
    """
    drop = round(p * MASK_LEVELS)
    n = count * x.numel()
    # from int64's lowest value with no upper bound, random_ draws all 64 bits: four uniform int16s
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(1 << 63), None)
    keep = bits.view(torch.int16)[:n].view(count, *x.shape) >= drop - MASK_LEVELS // 2
    return keep.to(x.dtype).mul_(MASK_LEVELS / (MASK_LEVELS - drop))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout of one tensor with a `dropout_masks` mask; the identity when off."""
    return x * dropout_masks(x, p)[0] if training and p > 0 else x


class LSTMLM(nn.Module):
    """embedding(V->H) -> dropout -> LSTM x num_layers (dropout between) -> dropout -> linear(H->V) logits.

    The layers are one-layer nn.LSTMs (each on the fused cuDNN or oneDNN kernel), so that the dropout between
    them is the project's own masks, drawn for a whole step at once.
    """

    def __init__(self, vocab_size: int, hidden_size: int = 200, num_layers: int = 2,
                 dropout: float = 0.2, init_range: float = 0.1):
        super().__init__()
        self.dropout_p = dropout
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.lstm = nn.ModuleList(nn.LSTM(hidden_size, hidden_size) for _ in range(num_layers))
        self.decoder = nn.Linear(hidden_size, vocab_size)
        for p in self.parameters():  # Zaremba: every parameter uniform in [-init_range, init_range]
            nn.init.uniform_(p, -init_range, init_range)
        self.register_load_state_dict_pre_hook(_from_one_multilayer_lstm)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (batch, time) symbol ids -> logits (batch, time, vocab) and the state after the last step.

        Inside, the network runs time-major from the embedding on, as the fused LSTM kernels lay their data
        out (about 5% faster on CPU than batch_first, which copies on the way in and out).
        """
        x = self.embed(x.t())
        masks = None  # the embedding's, one between each two layers, the output's
        if self.training and self.dropout_p > 0:
            masks = dropout_masks(x, self.dropout_p, len(self.lstm) + 1)
        hs, cs = [], []
        for k, layer in enumerate(self.lstm):
            if masks is not None:
                x = x * masks[k].to(x.dtype)  # bf16 under autocast
            x, (h, c) = layer(x, None if state is None else (state[0][k:k + 1], state[1][k:k + 1]))
            hs.append(h)
            cs.append(c)
        if masks is not None:
            x = x * masks[-1].to(x.dtype)
        return self.decoder(x).transpose(0, 1), (torch.cat(hs), torch.cat(cs))


def _from_one_multilayer_lstm(module, state_dict, prefix, *args) -> None:
    """Checkpoints written when the layers were one nn.LSTM (`lstm.weight_ih_l1`) load as `lstm.1.weight_ih_l0`."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}lstm.") and k.count(".") == prefix.count(".") + 1]:
        name, layer = key[len(prefix) + 5:].rsplit("_l", 1)
        state_dict[f"{prefix}lstm.{layer}.{name}_l0"] = state_dict.pop(key)


def detach(state: State | None) -> State | None:
    """Keep the values of a carried state but stop gradients at the window boundary (truncated BPTT)."""
    return None if state is None else (state[0].detach(), state[1].detach())
