"""Score a checkpoint on a whole PTB split, the hidden state carried from start to end.

    python -m charlm.evaluate CKPT [--split valid|test] [--batch-size N] [--data-dir D]
                                   [--dynamic [--dynamic-lr X] [--segment-len N] [--dynamic-decay L]]
                                   [--limit N] [--output JSON]

It prints and writes the figures (nll, bpc, ...) and where the bits go by kind of position (word start,
rest of word, ...). Batch size 1 is the course's and the literature's protocol; N > 1 scores N contiguous streams side by side
(faster; each stream's first symbol is not predicted, and the last len % N symbols are dropped).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from charlm import api, ptb
from charlm.cli import Parser, number, run
from charlm.errors import CharlmError
from charlm.files import write_json
from charlm.metrics import position_markdown
from charlm.symbols import kind


def parser() -> Parser:
    p = Parser(prog="python -m charlm.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a .ckpt written by python train.py")
    p.add_argument("--split", default="valid", choices=ptb.SPLITS)
    p.add_argument("--batch-size", type=number(int, lambda v: v >= 1, "an integer >= 1"), default=1)
    p.add_argument("--data-dir", help="directory with the PTB files (default: the data directory of the run "
                                       "that wrote the checkpoint, from its .hydra/config.yaml)")
    p.add_argument("--limit", type=number(int, lambda v: v >= 2, "an integer >= 2"), default=None,
                   help="score only the first N symbols of the split (quick checks)")
    p.add_argument("--dynamic", action="store_true", help="dynamic evaluation: adapt the weights as the text is scored")
    p.add_argument("--dynamic-lr", type=number(float, lambda v: v > 0, "a number > 0"), default=api.Dynamic.lr)
    p.add_argument("--segment-len", type=number(int, lambda v: v >= 1, "an integer >= 1"),
                   default=api.Dynamic.segment_len, help="symbols scored between two dynamic updates")
    p.add_argument("--dynamic-decay", type=number(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
                   default=api.Dynamic.decay, help="pull towards the trained weights after each update")
    p.add_argument("--output", help="JSON file to write (default: beside the checkpoint, "
                                    "<name>.<split>.b<N>[.dynamic].json)")
    return p


def run_data_dir(checkpoint: str) -> Path | None:
    """The data directory of the run that wrote `checkpoint` (<run>/checkpoints/*.ckpt): as the run resolved
    it (its metrics.json), else as its saved config resolves it now (paths.data_dir, which may read the
    environment); None for a checkpoint outside a run directory."""
    run = Path(checkpoint).expanduser().resolve().parent.parent
    try:
        return Path(json.loads((run / "metrics.json").read_text())["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):  # no metrics.json, or one written before it held data_dir
        pass
    saved = run / ".hydra" / "config.yaml"
    if not saved.is_file():
        return None
    data_dir = OmegaConf.select(OmegaConf.load(saved), "data.data_dir", default=None)
    return Path(data_dir).expanduser() if data_dir else None


def split_tokens(data_dir: Path | None, level: str, split: str, limit: int | None) -> list[str]:
    if data_dir is None:
        raise CharlmError("the checkpoint is not inside a run directory that names its data; pass --data-dir "
                          "with the directory of the PTB files")
    path = data_dir / ptb.filename(level, split)
    if not path.is_file():
        raise CharlmError(f"{path} does not exist; pass --data-dir with the directory of the PTB files "
                          f"(python train.py downloads them)")
    return ptb.read_tokens(path)[:limit]


def evaluate(args) -> dict:
    model = api.load(args.checkpoint)
    if model.kind.name not in ("char", "word"):  # the PTB files hold characters or words
        raise CharlmError(f"{args.checkpoint} was trained on a text file (data=text), not PTB; its run's "
                          f"metrics.json holds its valid and test figures")
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else run_data_dir(args.checkpoint)
    tokens = split_tokens(data_dir, model.kind.name, args.split, args.limit)
    dynamic = api.Dynamic(args.dynamic_lr, args.segment_len, args.dynamic_decay) if args.dynamic else None
    started = time.perf_counter()
    scores = model.score(tokens, batch_size=args.batch_size, dynamic=dynamic, positions=True)
    seconds = time.perf_counter() - started
    return {"checkpoint": str(Path(args.checkpoint).resolve()), "level": model.kind.name, "split": args.split,
            "batch_size": args.batch_size, "limit": args.limit, "dynamic": vars(dynamic) if dynamic else None, **scores,
            "seconds": round(seconds, 3), "symbols_per_s": round(scores["symbols"] / seconds, 1)}


def output_path(args) -> Path:
    if args.output:
        return Path(args.output)
    ckpt = Path(args.checkpoint)
    return ckpt.with_name(f"{ckpt.stem}.{args.split}.b{args.batch_size}{'.dynamic' if args.dynamic else ''}.json")


def body(args) -> None:
    result = evaluate(args)
    path = output_path(args)
    try:
        write_json(path, result)
    except OSError as e:
        raise CharlmError(f"cannot write {path} ({e.strerror}); pass --output to a writable place") from None
    how = f"batch {args.batch_size}" + (f", dynamic lr {args.dynamic_lr} every {args.segment_len}" if args.dynamic else "")
    print(f"{args.split}: {result['symbols']} symbols predicted ({how}) in {result['seconds']:.1f} s")
    print("  ".join(f"{k} {result[k]:.6f}" for k in kind(result["level"]).figures(result["nll"])))
    print(position_markdown(result["positions"]))
    print(f"json: {path}")


def main(argv: list[str] | None = None) -> int:
    return run(body, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
