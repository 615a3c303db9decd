"""The course's grading protocol: `python -m charlm.query CKPT`, one symbol per stdin line.

After loading it prints `OK GO`. For every line read (one symbol: `a`, `_`, `<eos>`, ...) it writes one line:
the log-probabilities of all vocabulary symbols for the next symbol, space separated, in vocabulary order.
The hidden state is carried from line to line. A line that is not a known symbol is answered with a line
starting with `error:` and leaves the state unchanged. End of input ends the process with exit code 0.
"""

from __future__ import annotations

import os
import sys

from charlm import api
from charlm.cli import Parser, run
from charlm.errors import CharlmError

DIGITS = 6  # fixed-point decimals: each probability is off by < 1e-6 relative, far inside the grader's 1e-4


def parser() -> Parser:
    p = Parser(prog="python -m charlm.query", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a .ckpt written by python train.py")
    return p


def serve(model: api.Model, lines, out) -> None:
    """Answer each symbol line of `lines` on `out`, flushing every answer."""
    row = " ".join([f"%.{DIGITS}f"] * len(model.vocab)) + "\n"
    state = None
    out.write("OK GO\n")
    out.flush()
    for line in lines:
        try:
            logp, state = model.next_logprobs(state, line.strip())
            out.write(row % tuple(logp.tolist()))
        except CharlmError as e:
            out.write(f"error: {e}\n")
        out.flush()


def body(args) -> None:
    model = api.load(args.checkpoint)
    try:
        serve(model, sys.stdin, sys.stdout)
    except BrokenPipeError:  # the reader went away: stop quietly, and keep Python's exit flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    return run(body, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
