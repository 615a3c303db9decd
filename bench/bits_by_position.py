"""What TensorBoard's where-the-bits-go table costs a validation: the valid split through the course's
network (2x200, batch 10, windows of 10) with LanguageModel's validation step, the table off and on,
alternating rounds in one process. The PTB files are read from $CHARLM_DATA_DIR.

    python bench/bits_by_position.py [rounds, default 5]
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch

from charlm import ptb
from charlm.data import Vocab, batchify
from charlm.module import LanguageModel
from charlm.nets import LSTMLM

torch.set_num_threads(1)
tokens = ptb.read_tokens(Path(os.environ["CHARLM_DATA_DIR"]) / "ptb.char.valid.txt")
vocab = Vocab(sorted(set(tokens)))
streams = batchify(torch.tensor([vocab.index[t] for t in tokens]), 10)
windows = [(streams[:, i : i + 10], streams[:, i + 1 : i + 11]) for i in range(0, streams.size(1) - 11, 10)]
module = LanguageModel(LSTMLM(len(vocab)), vocab.symbols).eval()


def validate(split: str) -> float:
    """One pass; "valid" sums the table as it goes, "test" is the same step without it."""
    started, module.eval_state = time.perf_counter(), None
    with torch.no_grad():
        for batch in windows:
            module._eval_step(split, batch)
    module.valid_positions.reset()
    return time.perf_counter() - started


times = {"without": [], "with": []}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    times["without"].append(validate("test"))
    times["with"].append(validate("valid"))
ratios = [w / o for w, o in zip(times["with"], times["without"])]
print(f"{len(windows)} windows; without {statistics.median(times['without']):.2f} s, with {statistics.median(times['with']):.2f} s;"
      f" with/without median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
