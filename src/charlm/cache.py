"""Tokenised splits cached on disk, so a run does not re-read and re-tokenise the text files every time.

The cache holds the vocabulary and the id tensors of the three splits, keyed by the MD5 of each source
file's bytes. It lives beside the data when that directory is writable, else in the user's cache
directory ($XDG_CACHE_HOME/charlm or ~/.cache/charlm). A cache whose key, format or checksum does not
match is never used: it is rebuilt from the text files and overwritten.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from charlm.files import atomic_write
from charlm.ptb import md5sum

VERSION = 1  # bump when the reading rule or the file layout changes
Splits = tuple[list[str], dict[str, torch.Tensor]]  # (vocabulary symbols, ids of each split)
log = logging.getLogger(__name__)


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charlm"


def writable(directory: Path) -> bool:
    """Writable by us and not marked read-only: root may write anywhere, but a directory with no write
    bit (like a shared, read-only data copy) is left alone."""
    return os.access(directory, os.W_OK) and bool(directory.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def locations(data_dir: Path, level: str) -> list[Path]:
    """Where the cache of `data_dir` may be, in the order tried: beside the data, then the user's cache."""
    data_dir = Path(data_dir).resolve()
    tag = hashlib.md5(str(data_dir).encode()).hexdigest()[:12]
    return [data_dir / f"ptb.{level}.ids.pt", user_cache_dir() / f"ptb.{level}.{tag}.ids.pt"]


def _checksum(ids: dict[str, torch.Tensor]) -> str:
    digest = hashlib.md5()
    for split in sorted(ids):
        digest.update(split.encode())
        digest.update(ids[split].numpy().tobytes())
    return digest.hexdigest()


def _read(path: Path, sources: dict[str, str]) -> Splits | None:
    """The cached splits at `path` if it is there, for these sources and intact; None otherwise."""
    try:
        saved = torch.load(path, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated, not a torch file, unreadable: rebuild
        log.warning("ignoring the unreadable token cache %s (%s)", path, e)
        return None
    try:
        symbols, ids = saved["symbols"], saved["ids"]
        ok = (saved["version"] == VERSION and saved["sources"] == sources and saved["checksum"] == _checksum(ids)
              and len(set(symbols)) == len(symbols) and all(isinstance(s, str) for s in symbols)
              and set(ids) == set(sources) and all(t.dim() == 1 and int(t.max()) < len(symbols) for t in ids.values()))
    except Exception:
        ok = False
    if not ok:
        log.info("token cache %s is stale or damaged; rebuilding it", path)
        return None
    return list(symbols), {s: t.long() for s, t in ids.items()}


def _write(path: Path, sources: dict[str, str], symbols: list[str], ids: dict[str, torch.Tensor]) -> bool:
    small = {s: t.to(torch.uint8 if len(symbols) <= 256 else torch.int32) for s, t in ids.items()}
    buffer = io.BytesIO()
    torch.save({"version": VERSION, "sources": sources, "symbols": list(symbols), "ids": small,
                "checksum": _checksum(small)}, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not writable(path.parent):
            return False
        atomic_write(path, buffer.getvalue())
    except OSError:  # read-only or full: try the next place
        return False
    return True


def load_or_build(files: dict[str, Path], data_dir: Path, level: str, build: Callable[[], Splits],
                  digests: dict[str, str] | None = None) -> Splits:
    """The vocabulary and split ids of `files`, from a valid cache if there is one, else `build()` then cached.
    `digests` (split -> MD5 of its file) spares hashing the files again when the caller already did."""
    if not all(path.is_file() for path in files.values()):
        return build()  # which says what is missing
    sources = digests or {split: md5sum(path) for split, path in files.items()}
    places = locations(data_dir, level)
    for path in places:
        found = _read(path, sources)
        if found is not None:
            return found
    symbols, ids = build()
    for path in places:
        if _write(path, sources, symbols, ids):
            log.info("cached the tokenised splits in %s", path)
            break
    return symbols, ids
