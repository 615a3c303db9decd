"""What a symbol is: one object the data hands over, which says how text becomes symbols and back, what a
symbol is called, and which figures judge a model of it. Nothing else in charlm branches on the kind.

  char  PTB characters (the course): `_` between words, `<eos>` ending a line; nll, bpc, ppl and ppl56
  word  PTB words (Zaremba et al.): whitespace-split, `<eos>` ending a line; nll and per-word ppl
  text  every character of any UTF-8 text is a symbol; nll, bpc and per-character ppl
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from charlm.ptb import EOS, SPACE, line_to_chars, tokenize

# The course scored characters by the word-level perplexity they imply: 5.6 characters per PTB word.
CHARS_PER_WORD = 5.6


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))


class Symbols:
    """PTB characters; the other kinds change what differs."""

    name, unit, headline = "char", "chars", "bpc"
    start = EOS  # what a text begins after: the end of a line
    space = SPACE  # what separates two words
    # the kinds of position a predicted symbol takes, for the where-the-bits-go table (charlm.inspect)
    positions = ("word start", "rest of word", "word boundary", "end of line", "digit or N", "punctuation")
    number = "N"  # PTB's stand-in for a number

    def split(self, text: str) -> list[str]:
        """Plain text -> symbols: each line's words as their characters with `_` between two words, `<eos>`
        (or a newline) ending a line, exactly as the character files were derived from the word files."""
        symbols: list[str] = []
        for i, line in enumerate(text.replace(EOS, "\n").split("\n")):
            symbols += ([EOS] if i else []) + line_to_chars(line)
        return symbols

    def join(self, symbols: Sequence[str]) -> str:
        """Symbols -> plain text: `<eos>` becomes a newline, `_` a space."""
        return "".join("\n" if s == EOS else " " if s == SPACE else s for s in symbols)

    def show(self, symbol: str) -> str:
        """How one symbol reads in running text (the inspect page): a space, a newline, the symbol itself."""
        return self.join([symbol])

    def position(self, previous: str, symbol: str) -> str:
        """The kind of position (one of `positions`) of `symbol` read after `previous`."""
        if symbol == self.start:
            return "end of line"
        if symbol == self.space:
            return "word boundary"
        if symbol.isdigit() or symbol == self.number:
            return self.positions[4]
        if not symbol.isalpha():
            return "punctuation"
        return "word start" if previous in (self.space, self.start) else "rest of word"

    def figures(self, nll: float) -> dict[str, float]:
        """Mean NLL (nats per symbol) -> every figure reported for this kind; the headline among them."""
        return {"nll": nll, "bpc": nll / math.log(2), "ppl": _exp(nll), "ppl56": _exp(CHARS_PER_WORD * nll)}

    def step_figure(self, loss):
        """The headline figure of one training window from its mean NLL tensor, without a device sync."""
        return loss / math.log(2)

    def __repr__(self) -> str:
        return f"<{self.name} symbols>"


class Words(Symbols):
    name, unit, headline = "word", "words", "ppl"
    space = None
    positions = ("word", "end of line", "N", "<unk>")

    def show(self, symbol: str) -> str:
        return "\n" if symbol == EOS else symbol + " "

    def position(self, previous: str, symbol: str) -> str:
        return "end of line" if symbol == EOS else symbol if symbol in ("N", "<unk>") else "word"

    def split(self, text: str) -> list[str]:
        return tokenize(text)

    def join(self, symbols: Sequence[str]) -> str:
        """Words joined by spaces, `<eos>` ending a line."""
        lines, line = [], []
        for s in symbols:
            if s == EOS:
                lines.append(" ".join(line))
                line = []
            else:
                line.append(s)
        return "\n".join(lines + [" ".join(line)])

    def figures(self, nll: float) -> dict[str, float]:
        return {"nll": nll, "ppl": _exp(nll)}

    def step_figure(self, loss):
        return loss.exp()


class Text(Symbols):
    name = "text"
    start, space, number = "\n", " ", None
    positions = ("word start", "rest of word", "word boundary", "end of line", "digit", "punctuation")

    def split(self, text: str) -> list[str]:
        return list(text)

    def join(self, symbols: Sequence[str]) -> str:
        return "".join(symbols)

    def figures(self, nll: float) -> dict[str, float]:
        return {"nll": nll, "bpc": nll / math.log(2), "ppl": _exp(nll)}


KINDS = {kind.name: kind for kind in (Symbols(), Words(), Text())}


def kind(name: str) -> Symbols:
    """The kind a name (as a checkpoint or metrics.json keeps it) stands for."""
    return KINDS[name]
