"""Continue a prime from a checkpoint: `python -m charlm.sample CKPT --prime "the company said" --length 300`.

Samples from softmax(logits / temperature), reproducible with --seed, or takes the most likely symbol at
every step with --greedy. Prints the prime followed by its continuation.
"""

from __future__ import annotations

import sys

from charlm import api
from charlm.cli import Parser, number, run


def parser() -> Parser:
    p = Parser(prog="python -m charlm.sample", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a .ckpt written by python train.py")
    p.add_argument("--prime", default="", help="text to continue (default: start a new line)")
    p.add_argument("--length", type=number(int, lambda v: v >= 0, "an integer >= 0"), default=300,
                   help="symbols to generate")
    p.add_argument("--temperature", type=number(float, lambda v: v > 0, "a number > 0"), default=1.0)
    p.add_argument("--seed", type=int, default=None, help="make the sample reproducible")
    p.add_argument("--greedy", action="store_true", help="take the most likely symbol at every step")
    return p


def body(args) -> None:
    model = api.load(args.checkpoint)
    print(model.sample(args.prime, args.length, args.temperature, greedy=args.greedy, seed=args.seed))


def main(argv: list[str] | None = None) -> int:
    return run(body, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
