"""Dropout masks drawn the fast way, and the places LSTMLM's dropout options take, shared by the networks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

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


def draw_masks(like: torch.Tensor, places: dict) -> dict:
    """{place: (shape, p)} -> {place: mask}, all from one `dropout_masks` draw; {} when there is none."""
    if not places:
        return {}
    shapes, ps = zip(*places.values())
    return dict(zip(places, dropout_masks(like, shapes, ps)))


class StackDropout:
    """LSTMLM's dropout options for any network of embedding -> stacked recurrent layers -> decoder, mixed into
    its nn.Module (which has `embed` and `decoder`), so that every such network drops in the same places, from
    one draw per training step: the rates, the masks, and the two ends of forward with theirs applied; and
    the modules of such a stack, built and initialised alike (_build_stack)."""

    def _dropout_options(self, dropout: float, dropout_input: float | None, dropout_hidden: float | None,
                         dropout_output: float | None, locked_dropout: bool, dropout_embedding: float,
                         weight_drop: float) -> None:
        self.p_input, self.p_hidden, self.p_output = (dropout if p is None else p
                                                      for p in (dropout_input, dropout_hidden, dropout_output))
        self.locked, self.p_embedding, self.p_weight = locked_dropout, dropout_embedding, weight_drop

    def _build_stack(self, vocab_size: int, hidden_size: int, num_layers: int, init_range: float,
                     embedding_size: int | None, tie_weights: bool, layers: str, make_layer) -> None:
        """embed, the layers (`make_layer(input width, output width)`, kept as attribute `layers`) and decoder,
        registered in that order, every parameter uniform in [-init_range, init_range] (Zaremba); with
        `tie_weights` the decoder uses the embedding's matrix, the last layer sized to match (AWD-LSTM)."""
        embedding_size = embedding_size or hidden_size
        widths = [embedding_size] + [hidden_size] * (num_layers - 1) + [embedding_size if tie_weights else hidden_size]
        self.embed = nn.Embedding(vocab_size, embedding_size)
        setattr(self, layers, nn.ModuleList(make_layer(widths[k], widths[k + 1]) for k in range(num_layers)))
        self.decoder = nn.Linear(widths[-1], vocab_size)
        for p in self.parameters():
            nn.init.uniform_(p, -init_range, init_range)
        if tie_weights:
            self.decoder.weight = self.embed.weight

    def _stack_masks(self, steps_batch: torch.Size, widths: Sequence[int], hidden_weights: Sequence) -> dict:
        """A training step's masks, from one draw: per layer input (k, widths[k] wide), the output's (widths[-1]),
        and the embedding's and weight drop's (on hidden_weights[k]) when they are on. Locked masks have one
        time step, broadcast over the window."""
        steps, batch = steps_batch
        time = 1 if self.locked else steps
        places: dict = {}
        if self.p_embedding > 0:
            places["embedding"] = ((self.embed.num_embeddings, 1), self.p_embedding)
        for k, width in enumerate(widths[:-1]):
            p = self.p_input if k == 0 else self.p_hidden
            if p > 0:
                places[k] = ((time, batch, width), p)
        if self.p_output > 0:
            places["output"] = ((time, batch, widths[-1]), self.p_output)
        if self.p_weight > 0:
            for k, weight in enumerate(hidden_weights):
                places["weight", k] = (tuple(weight.shape), self.p_weight)
        return draw_masks(self.embed.weight, places)

    def _embedded(self, x: torch.Tensor, masks: dict) -> torch.Tensor:
        """The embeddings of ids x, with whole symbols dropped by the embedding mask."""
        weight = self.embed.weight
        if "embedding" in masks:
            weight = weight * masks["embedding"]
        return F.embedding(x, weight)

    def _decoded(self, x: torch.Tensor, masks: dict, state, outputs: bool) -> tuple:
        """forward's return from the last layer's time-major output x: logits (batch, time, vocab), the state, and
        with `outputs` the output before and after its dropout."""
        raw = x
        if "output" in masks:
            x = x * masks["output"].to(x.dtype)  # bf16 under autocast
        logits = self.decoder(x).transpose(0, 1)
        return (logits, state, (raw, x)) if outputs else (logits, state)
