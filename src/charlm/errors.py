"""The one exception type a user can act on, and the one way every entry point reports it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

EXIT_CODE = 2  # bad input, as argparse exits


class CharlmError(Exception):
    """A problem the user can fix (bad config, missing file, corrupt checkpoint): the message says how."""


def report(error: CharlmError) -> None:
    """The one line a user sees for a CharlmError."""
    print(f"error: {error}", file=sys.stderr)


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """A CharlmError raised inside becomes one `error: ...` line on stderr and exit code 2, no traceback."""
    try:
        yield
    except CharlmError as e:
        report(e)
        sys.exit(EXIT_CODE)
