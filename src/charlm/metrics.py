"""Every figure the project reports derives from one number: the mean NLL per symbol, in nats."""

import math

# The course scored characters by the word-level perplexity they imply: 5.6 characters per PTB word.
CHARS_PER_WORD = 5.6


def from_nll(nll: float) -> dict[str, float]:
    """NLL (nats per symbol) -> bits per character, per-symbol perplexity and the course's exp(5.6 NLL)."""
    return {
        "nll": nll,
        "bpc": nll / math.log(2),
        "ppl": math.exp(min(nll, 700.0)),
        "ppl56": math.exp(min(CHARS_PER_WORD * nll, 700.0)),
    }
