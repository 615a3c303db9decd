"""What the command-line tools share: one-line argument errors, and CharlmError as one line (charlm.errors)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from charlm.errors import exit_on_error


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def number(kind: type, test: Callable[[float], bool], allowed: str) -> Callable[[str], float]:
    """An argparse type: a number of `kind` passing `test`, else one line saying the allowed range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {allowed}")
        return value
    return parse


def run(body: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv` and run `body`; a CharlmError becomes one `error:` line on stderr and exit code 2 (SystemExit)."""
    args = parser.parse_args(argv)
    try:
        with exit_on_error():
            body(args)
    except KeyboardInterrupt:
        return 130
    return 0
