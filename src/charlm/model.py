"""The course's network, and the regularisers of AWD-LSTM (Merity et al. 2018) as options, each off by default:
lookup table, dropout, stacked LSTM with dropout between and after, linear."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# The carried state: every layer's h and every layer's c, each (1, batch, its width); layers may differ in width.
State = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]

MASK_LEVELS = 1 << 16  # a dropout mask element is 16 random bits


def dropout_masks(like: torch.Tensor, shapes: Sequence[Sequence[int]], ps: Sequence[float]) -> list[torch.Tensor]:
    """Inverted-dropout masks of the given shapes and drop rates, in `like`'s dtype and device, from one draw.

    Why not F.dropout: its bernoulli_ draws one random number per element, where each element here takes
    16 bits, four elements per 64-bit draw of torch's generator, and all of a step's masks come from one
    draw. On CPU that is 2-3x faster, and F.dropout's three calls were a tenth of a course training step
    (`python bench/throughput.py --tricks` measures it). The masks are consecutive runs of the same bits,
    so drawing them together gives what drawing them one by one would. p is rounded to a multiple of
    1/65536 (0.2 -> 0.200003) and the kept values are scaled by the inverse of the rounded keep rate, so
    the expected output is still the input.
    """
    sizes = [math.prod(shape) for shape in shapes]
    n = sum(sizes)
    # from int64's lowest value with no upper bound, random_ draws all 64 bits: four uniform int16s
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-(1 << 63), None)
    masks = []
    for chunk, shape, p in zip(bits.view(torch.int16)[:n].split(sizes), shapes, ps):
        drop = round(p * MASK_LEVELS)
        keep = chunk.view(*shape) >= drop - MASK_LEVELS // 2
        masks.append(keep.to(like.dtype).mul_(MASK_LEVELS / (MASK_LEVELS - drop)))
    return masks


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout of one tensor with a `dropout_masks` mask; the identity when off."""
    return x * dropout_masks(x, [x.shape], [p])[0] if training and p > 0 else x


class LSTMLM(nn.Module):
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
        self.p_input, self.p_hidden, self.p_output = (dropout if p is None else p
                                                      for p in (dropout_input, dropout_hidden, dropout_output))
        self.locked, self.p_embedding, self.p_weight = locked_dropout, dropout_embedding, weight_drop
        embedding_size = embedding_size or hidden_size
        widths = [embedding_size] + [hidden_size] * (num_layers - 1) + [embedding_size if tie_weights else hidden_size]
        self.embed = nn.Embedding(vocab_size, embedding_size)
        self.lstm = nn.ModuleList(nn.LSTM(widths[k], widths[k + 1]) for k in range(num_layers))
        self.decoder = nn.Linear(widths[-1], vocab_size)
        for p in self.parameters():  # Zaremba: every parameter uniform in [-init_range, init_range]
            nn.init.uniform_(p, -init_range, init_range)
        if tie_weights:
            self.decoder.weight = self.embed.weight
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
        weight = self.embed.weight
        if "embedding" in masks:
            weight = weight * masks["embedding"]
        x = F.embedding(x, weight)
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
        raw = x
        if "output" in masks:
            x = x * masks["output"].to(x.dtype)
        logits, state = self.decoder(x).transpose(0, 1), (tuple(hs), tuple(cs))
        return (logits, state, (raw, x)) if outputs else (logits, state)

    def _masks(self, steps_batch: torch.Size) -> dict:
        """A training step's masks, from one draw: per layer input (k), the output's, and the embedding's and
        weight drop's when they are on. Locked masks have one time step, broadcast over the window."""
        steps, batch = steps_batch
        time = 1 if self.locked else steps
        places: dict = {}
        if self.p_embedding > 0:
            places["embedding"] = ((self.embed.num_embeddings, 1), self.p_embedding)
        for k, layer in enumerate(self.lstm):
            p = self.p_input if k == 0 else self.p_hidden
            if p > 0:
                places[k] = ((time, batch, layer.input_size), p)
        if self.p_output > 0:
            places["output"] = ((time, batch, self.lstm[-1].hidden_size), self.p_output)
        if self.p_weight > 0:
            for k, layer in enumerate(self.lstm):
                places["weight", k] = (tuple(layer.weight_hh_l0.shape), self.p_weight)
        if not places:
            return {}
        shapes, ps = zip(*places.values())
        return dict(zip(places, dropout_masks(self.embed.weight, shapes, ps)))


def _from_one_multilayer_lstm(module, state_dict, prefix, *args) -> None:
    """Checkpoints written when the layers were one nn.LSTM (`lstm.weight_ih_l1`) load as `lstm.1.weight_ih_l0`."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}lstm.") and k.count(".") == prefix.count(".") + 1]:
        name, layer = key[len(prefix) + 5:].rsplit("_l", 1)
        state_dict[f"{prefix}lstm.{layer}.{name}_l0"] = state_dict.pop(key)


def detach(state: State | None) -> State | None:
    """Keep the values of a carried state but stop gradients at the window boundary (truncated BPTT)."""
    return None if state is None else tuple(tuple(t.detach() for t in part) for part in state)
