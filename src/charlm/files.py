"""Reading a text file with one-line errors; writing files so that a kill at any moment leaves the old file
or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from charlm.errors import CharlmError


def read_text(path: Path, label: str, fix: str, empty: str | None = None) -> str:
    """A UTF-8 text file's exact characters (no newline translation). A missing file, a directory, another
    encoding or a blank text is one CharlmError naming `label`, saying what to do: `fix` (`empty` if blank)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CharlmError(f"{label} does not exist; {fix}") from None
    except IsADirectoryError:
        raise CharlmError(f"{label} is a directory; {fix}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CharlmError(f"{label} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise CharlmError(f"{label} is empty; {empty or fix}")
    return text


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: no half file ever has the final name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode a plain open() would give, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value) -> None:
    """`value` as indented JSON, written atomically."""
    atomic_write(path, (json.dumps(value, indent=2) + "\n").encode())
