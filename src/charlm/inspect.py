"""See what a model learned: a text as a checkpoint reads it, on one self-contained HTML page.

    python -m charlm.inspect CKPT [--text FILE | --split valid|test] [--limit N] [--data-dir D] [--out PAGE]

Each symbol is shaded by its surprisal in bits, the state carried from the start at batch 1 as
charlm.evaluate scores (the page's mean is evaluate's bpc on the same symbols); hovering or focusing one
shows the model's five best guesses for it and the true symbol's rank; a table says where the bits go by kind
of position; and for a network with `cell_states` (the LSTM, the Mogrifier) the cell units that best track
simple properties of the position are drawn as colour strips under the text, any other unit on demand.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from charlm import api, page, ptb
from charlm.cli import Parser, number, run
from charlm.errors import CharlmError
from charlm.evaluate import run_data_dir, split_tokens
from charlm.files import read_text
from charlm.metrics import PositionBits
from charlm.symbols import Symbols

TOP = 5  # guesses shown per symbol
LIMIT = 3000  # symbols on a page by default


@dataclass
class Reading:
    """What a model made of `symbols`: arrays over the predicted symbols, symbols[1:] (the first is given)."""

    symbols: list[str]
    bits: np.ndarray  # (N-1,) surprisal of each predicted symbol, in bits
    guesses: np.ndarray  # (N-1, TOP) vocabulary ids, best first
    probs: np.ndarray  # (N-1, TOP) their probabilities
    rank: np.ndarray  # (N-1,) the true symbol's rank among all, 1 = the best guess
    positions: list[dict]  # where the bits go (metrics.PositionBits' rows)
    cells: np.ndarray | None  # (N-1, units) the cell states after reading symbols[:-1]; None: not exposed

    @property
    def mean_bits(self) -> float:
        return float(self.bits.mean())


def read(model: api.Model, symbols: list[str], max_chunk: int = api.MAX_CHUNK) -> Reading:
    """Read `symbols` from a zero state at batch 1, streaming (bounded memory), keeping per-symbol results."""
    ids = model.encode(symbols)
    if len(ids) < 2:
        raise CharlmError(f"{len(ids)} symbol is too few: the page needs at least 2 (the first is not predicted)")
    streams = ids[None].to(model.device)
    table = PositionBits(model.kind, model.vocab.symbols).to(model.device)
    cells = hasattr(model.net, "cell_states")
    parts: dict[str, list] = {k: [] for k in ("bits", "guesses", "probs", "rank", "cells")}
    for x, y, logp, c in model.read(streams, max_chunk, cells=cells):
        lp, true = logp[0], logp[0].gather(-1, y[0][:, None])[:, 0]
        table.update(x, y, -true[None])
        top = lp.topk(min(TOP, lp.size(-1)), dim=-1)  # a vocabulary may hold fewer symbols
        parts["bits"].append(-true.double().cpu() / math.log(2))
        parts["guesses"].append(top.indices.cpu())
        parts["probs"].append(top.values.exp().cpu())
        parts["rank"].append(((lp > true[:, None]).sum(-1) + 1).cpu())
        if c is not None:
            parts["cells"].append(c[0].float().cpu())
    joined = {k: torch.cat(v).numpy() if v else None for k, v in parts.items()}
    return Reading(list(symbols), positions=table.compute(), **joined)


def properties(kind: Symbols, symbols: list[str]) -> dict[str, np.ndarray]:
    """Simple facts of each symbol read (symbols[:-1]), for the cells that track them; constant ones left out."""
    in_word, in_line, word, line = [], [], 0, 0
    for s in symbols[:-1]:
        word = 0 if s in (kind.space, kind.start) else word + 1
        line = 0 if s == kind.start else line + 1
        in_word.append(word)
        in_line.append(line)
    facts = {"position in the word": in_word if kind.space is not None else [],
             "inside a number (digit or N)": [float(s.isdigit() or s == kind.number) for s in symbols[:-1]],
             "symbols since the line began": in_line}
    return {name: np.asarray(v, dtype=float) for name, v in facts.items() if len(v) and np.ptp(v) > 0}


def tracking_units(cells: np.ndarray, facts: dict[str, np.ndarray]) -> list[dict]:
    """For each fact, the unit whose activation correlates with it best (Pearson's r, either sign)."""
    z = (cells - cells.mean(0)) / np.maximum(cells.std(0), 1e-8)
    found = []
    for name, fact in facts.items():
        r = z.T @ ((fact - fact.mean()) / fact.std()) / len(fact)
        unit = int(np.abs(r).argmax())
        found.append({"property": name, "unit": unit, "r": float(r[unit])})
    return found


# --- the command ----------------------------------------------------------------------------------------
def parser() -> Parser:
    p = Parser(prog="python -m charlm.inspect", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a .ckpt written by python train.py")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", help="a UTF-8 text file to read (default: the valid split)")
    source.add_argument("--split", choices=ptb.SPLITS, help="a PTB split (default: valid)")
    p.add_argument("--data-dir", help="directory with the PTB files (default: the run's, as charlm.evaluate)")
    p.add_argument("--limit", type=number(int, lambda v: v == 0 or v >= 2, "0 (all) or an integer >= 2"),
                   default=LIMIT, help=f"read the first N symbols (default {LIMIT}; 0: all, the page grows with it)")
    p.add_argument("--out", help="the HTML file to write (default: beside the checkpoint, <name>.<source>.html)")
    return p


def text_symbols(model: api.Model, path: Path, limit: int | None) -> list[str]:
    """The symbols of a text file, each one checked: an unknown one is named with its line and column."""
    text = read_text(path, str(path), "pass --text a UTF-8 text file", empty="give --text a file with at least two symbols")
    symbols = model.symbols(text)[:limit]
    line, column = 1, 0
    for s in symbols:
        column += 1
        if s not in model.vocab.index:
            raise CharlmError(f"{path}, line {line}, symbol {column}: {s!r} is not one of the model's "
                              f"{len(model.vocab)} symbols; remove it or replace it with one of the training text's")
        if s == model.kind.start:
            line, column = line + 1, 0
    return symbols


def body(args) -> None:
    model = api.load(args.checkpoint)
    limit = args.limit or None
    if args.text:
        symbols, source = text_symbols(model, Path(args.text), limit), Path(args.text).name
    else:
        if model.kind.name not in ("char", "word"):
            raise CharlmError(f"{args.checkpoint} was trained on a text file (data=text), not PTB; pass --text")
        split = args.split or "valid"
        data_dir = Path(args.data_dir).expanduser() if args.data_dir else run_data_dir(args.checkpoint)
        symbols, source = split_tokens(data_dir, model.kind.name, split, limit), f"PTB {split}"
    reading = read(model, symbols)
    facts = properties(model.kind, symbols) if reading.cells is not None else {}
    tracked = tracking_units(reading.cells, facts) if facts else []
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(f".{source.replace(' ', '_')}.html")
    html = page.render(model, reading, tracked, title=f"{Path(args.checkpoint).name} on {source}")
    try:
        out.write_text(html, encoding="utf-8")
    except OSError as e:
        raise CharlmError(f"cannot write {out} ({e.strerror}); pass --out a writable place") from None
    figure = model.kind.figures(reading.mean_bits * math.log(2))
    print(f"{len(symbols) - 1} symbols predicted: {model.kind.headline} {figure[model.kind.headline]:.4f}, "
          f"mean {reading.mean_bits:.4f} bits per {model.kind.unit[:-1]}")
    for t in tracked:
        print(f"  unit {t['unit']} tracks {t['property']} (r = {t['r']:+.2f})")
    print(f"page: {out} ({out.stat().st_size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> int:
    return run(body, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
