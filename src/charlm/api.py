"""A trained checkpoint as a Python object: score text, query it symbol by symbol, sample from it.

    import charlm
    lm = charlm.load("outputs/runs/<time>/checkpoints/best.ckpt")
    lm.score("the company said")            # {'nll': ..., 'bpc': ..., 'ppl': ..., 'ppl56': ..., 'symbols': ...}
    logp, state = lm.next_logprobs(None, "t")  # log-probabilities of every vocabulary symbol, in vocab order
    lm.sample("the company said", length=100, temperature=0.8, seed=1)

The command-line tools `charlm.evaluate`, `charlm.query` and `charlm.sample` are thin wrappers of this.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from charlm import checkpoint, nets
from charlm.data import Vocab, batchify
from charlm.errors import CharlmError
from charlm.metrics import PositionBits
from charlm.symbols import Symbols, kind

CHUNK_VALUES = 1 << 22  # logits held at once while scoring (16 MiB of float32): bounds chunk length x batch x V
MAX_CHUNK = 4096  # steps per network call while scoring


# --- dynamic evaluation -------------------------------------------------------------------------------
@dataclass
class Dynamic:
    """Dynamic evaluation (Krause et al.): score a segment, then take one SGD step on its mean NLL.

    `decay` pulls the adapted weights back towards the trained ones after each step (0: no pull).
    The defaults were the best of a small grid on the first 30k valid symbols (docs/evaluation.md).
    """

    lr: float = 0.3
    segment_len: int = 50
    decay: float = 0.0


# --- the model ---------------------------------------------------------------------------------------
class Model:
    """A trained network with its vocabulary and kind of symbol; every method works in eval mode and leaves
    the weights as loaded. It uses only the network's forward, and its one-symbol `step` where it has one."""

    def __init__(self, net: nn.Module, vocab: Vocab | Sequence[str], symbols: Symbols | str = "char"):
        self.net = net
        self.vocab = vocab if isinstance(vocab, Vocab) else Vocab(list(vocab))
        self.kind = kind(symbols) if isinstance(symbols, str) else symbols
        self._ids = torch.arange(len(self.vocab), device=self.device)[:, None]  # symbol i as a batch of 1

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # symbols
    def symbols(self, text: str | Sequence[str]) -> list[str]:
        """Plain text -> this model's symbols (a list of symbols is taken as it is)."""
        return self.kind.split(text) if isinstance(text, str) else list(text)

    def text(self, symbols: Sequence[str]) -> str:
        return self.kind.join(symbols)

    def encode(self, text: str | Sequence[str], what: str = "the text") -> torch.Tensor:
        """Text or symbols -> ids; symbols outside the vocabulary are an error that names all of them."""
        symbols = self.symbols(text)
        unknown = list(dict.fromkeys(s for s in symbols if s not in self.vocab.index))
        if unknown:
            shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            known = " ".join(self.vocab.symbols) if len(self.vocab) <= 60 else f"{len(self.vocab)} symbols"
            raise CharlmError(f"{what} holds symbols the model's vocabulary lacks: {shown}; "
                              f"use only the training symbols ({known})")
        return torch.tensor([self.vocab.index[s] for s in symbols], dtype=torch.long)

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        """Eval mode (no dropout) for the duration, then back to training mode if the network was in it."""
        was_training = self.net.training
        if was_training:  # switching costs ~30 us, a tenth of a query step: only when needed
            self.net.eval()
        try:
            yield
        finally:
            if was_training:
                self.net.train()

    # one symbol at a time
    def _step(self, ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """ids (batch,) -> logits (batch, V) for the next symbol, and the new state: the network's own
        `step` where it has one, else its forward over one step."""
        if hasattr(self.net, "step"):
            return self.net.step(ids, state)
        logits, state = self.net(ids[:, None], state)
        return logits[:, 0], state

    def next_logprobs(self, state: Any, symbol: str) -> tuple[torch.Tensor, Any]:
        """Read `symbol` after `state` (None: the start of a text); return the log-probabilities of every
        vocabulary symbol for the next one, in vocabulary order, and the new state. The old state is kept."""
        if symbol not in self.vocab.index:
            raise CharlmError(f"unknown symbol {symbol!r}: not one of the model's {len(self.vocab)} symbols; "
                              f"the state is unchanged")
        with self._eval(), torch.no_grad():
            logits, state = self._step(self._ids[self.vocab.index[symbol]], state)
        return F.log_softmax(logits[0].float(), -1), state

    # whole texts
    def score(self, text: str | Sequence[str], batch_size: int = 1, dynamic: Dynamic | None = None,
              max_chunk: int = MAX_CHUNK, positions: bool = False) -> dict:
        """Mean NLL over every predicted symbol of `text` (all but the first of each of `batch_size`
        contiguous streams), the hidden state carried from start to end, accumulated in float64.
        Returns the kind's figures (nll, bpc, ...), plus `symbols`, the number predicted; with `positions`,
        also where the bits go by kind of position (metrics.PositionBits' rows).
        Without `dynamic`, the text goes through the network in chunks of at most `max_chunk` steps (fewer
        where a chunk's logits would pass CHUNK_VALUES): the result is the same, up to rounding, whatever it is."""
        ids = self.encode(text)
        if len(ids) < 2 * batch_size:
            raise CharlmError(f"{len(ids)} symbols are too few to score at batch size {batch_size}: "
                              f"each of the {batch_size} streams needs at least 2")
        streams = batchify(ids, batch_size).to(self.device)
        table = PositionBits(self.kind, self.vocab.symbols).to(self.device) if positions else None
        total, count = self._dynamic_nll(streams, dynamic, table) if dynamic else self._nll(streams, max_chunk, table)
        return {**self.kind.figures(total / count), "symbols": count, **({"positions": table.compute()} if table else {})}

    def read(self, streams: torch.Tensor, max_chunk: int = MAX_CHUNK,
             cells: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Read batched streams (batch, length) of ids chunk by chunk, the state carried from start to end:
        for each chunk, its inputs and targets (batch, steps) each, the log-probabilities of every symbol at each step
        (batch, steps, V) and, with `cells`, the network's per-step cell states (its `cell_states`), else None.
        Memory stays bounded however long the streams (chunks of at most `max_chunk` steps and CHUNK_VALUES)."""
        chunk = max(1, min(max_chunk, CHUNK_VALUES // (streams.size(0) * len(self.vocab))))
        state = None
        with self._eval():
            for start in range(0, streams.size(1) - 1, chunk):
                y = streams[:, start + 1 : start + chunk + 1]
                x = streams[:, start : start + y.size(1)]
                with torch.no_grad():  # not held across the yield: the caller's code keeps its grad mode
                    if cells:
                        logits, state, c = self.net.cell_states(x, state)
                    else:
                        (logits, state), c = self.net(x, state), None
                    logp = F.log_softmax(logits.float(), -1)
                yield x, y, logp, c

    def _nll(self, streams: torch.Tensor, max_chunk: int = MAX_CHUNK, table: PositionBits | None = None) -> tuple[float, int]:
        """Sum of NLL over batched streams, one fused network call per chunk of up to `max_chunk` steps;
        each symbol's added to `table` where given."""
        total = torch.zeros((), dtype=torch.float64, device=streams.device)
        for x, y, logp, _ in self.read(streams, max_chunk):
            nll = -logp.gather(-1, y[..., None])[..., 0]
            total += nll.double().sum()
            if table is not None:
                table.update(x, y, nll)
        return float(total), streams[:, 1:].numel()

    def _dynamic_nll(self, streams: torch.Tensor, dyn: Dynamic, table: PositionBits | None = None) -> tuple[float, int]:
        """Score each segment with the weights adapted on all segments before it, then adapt on it."""
        if not (dyn.lr > 0 and dyn.segment_len >= 1 and 0 <= dyn.decay < 1):
            raise CharlmError(f"dynamic evaluation needs lr > 0, segment_len >= 1 and 0 <= decay < 1, got {dyn}")
        net = copy.deepcopy(self.net).eval()  # adapt a copy: this model keeps its trained weights
        trained = [p.detach().clone() for p in net.parameters()]
        opt = torch.optim.SGD(net.parameters(), lr=dyn.lr)
        total = torch.zeros((), dtype=torch.float64, device=streams.device)
        state = None
        for start in range(0, streams.size(1) - 1, dyn.segment_len):
            x, y = streams[:, start : start + dyn.segment_len], streams[:, start + 1 : start + dyn.segment_len + 1]
            logits, state = net(x[:, : y.size(1)], state)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
            total += nll.detach().double().sum()
            if table is not None:
                table.update(x[:, : y.size(1)], y, nll.detach().view_as(y))
            opt.zero_grad(set_to_none=True)
            nll.mean().backward()
            opt.step()
            if dyn.decay:
                with torch.no_grad():
                    for p, p0 in zip(net.parameters(), trained):
                        p.lerp_(p0, dyn.decay)
            state = nets.detach(state)
        return float(total), streams[:, 1:].numel()

    def sample(self, prime: str | Sequence[str] = "", length: int = 200, temperature: float = 1.0,
               greedy: bool = False, seed: int | None = None) -> str:
        """The prime followed by `length` generated symbols, as text. Sampling draws from softmax(logits /
        temperature) with its own generator (the global RNG is left alone); `greedy` takes the argmax.
        An empty prime starts at the beginning of a line (after `<eos>`)."""
        if length < 0 or not (greedy or temperature > 0):
            raise CharlmError(f"length must be >= 0 and temperature > 0 (got {length}, {temperature}); "
                              f"use greedy for the most likely continuation")
        symbols = self.symbols(prime)
        ids = self.encode(symbols, what="the prime")
        if not len(ids):
            start = self.kind.start
            if start not in self.vocab.index:
                raise CharlmError(f"this vocabulary has no {start!r} to start from; give a prime")
            ids = torch.tensor([self.vocab.index[start]])
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        out: list[int] = []
        with self._eval(), torch.no_grad():
            logits, state = self.net(ids[None].to(self.device))
            logits = logits[:, -1]
            for i in range(length):
                if greedy:
                    nxt = int(logits[0].argmax())
                else:
                    probs = F.softmax(logits[0].float().cpu() / temperature, -1)
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
                out.append(nxt)
                if i + 1 < length:
                    logits, state = self._step(torch.tensor([nxt], device=self.device), state)
        return self.text(symbols + [self.vocab.symbols[i] for i in out])


# --- loading -----------------------------------------------------------------------------------------
def load(path: str | Path, device: str | torch.device = "cpu") -> Model:
    """Load a checkpoint written by `python train.py` (best.ckpt, last.ckpt) as a Model on `device`."""
    path = Path(path).expanduser()
    ckpt = checkpoint.read(path)
    extra = ckpt["charlm"]
    vocab = Vocab(list(extra["vocab"]))
    net = nets.build(checkpoint.net_config(ckpt), len(vocab))
    weights = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise CharlmError(f"{path}'s weights do not fit the network its hyper-parameters describe "
                          f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}); "
                          f"the file is corrupt or from another version") from None
    return Model(net.to(device).eval(), vocab, checkpoint.symbols(ckpt))
