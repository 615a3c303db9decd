"""Where a training step's time goes: the project's step and the plain loop's, under torch.profiler.

    python bench/step_profile.py                 # the course's configuration
    python bench/step_profile.py model.hidden_size=512 trainer.precision=bf16-mixed   # any train.py overrides

Both loops of bench/throughput.py run the same steps under the profiler; each step's wall time is split
into the LSTM kernels (oneDNN or cuDNN, forward and backward), every other torch op, and the rest: Python,
the framework's and the loop's own. The profiler adds its own cost to every op, so the split is a guide
to where the time goes, and throughput.py (no profiler) the measure of how fast each loop is.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as bench  # noqa: E402

STEPS, WARMUP = 100, 20
LSTM_KERNELS = ("rnn", "lstm")  # aten::mkldnn_rnn_layer(_backward), aten::_cudnn_rnn(_backward), ...


def split(prof, wall: float, steps: int) -> dict[str, float]:
    """ms per step: LSTM kernels, other torch ops, the rest (self times of the ops; their sum is the ops' time)."""
    lstm = other = 0.0
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        if any(k in e.key for k in LSTM_KERNELS):
            lstm += e.self_cpu_time_total
        else:
            other += e.self_cpu_time_total
    lstm, other = lstm / 1e3 / steps, other / 1e3 / steps
    return {"step": wall / steps * 1e3, "lstm": lstm, "other ops": other, "python and loop": wall / steps * 1e3 - lstm - other}


class Profile(L.Callback):
    """Profiles the steps after WARMUP, from the batch-end hook before the first to the last one's."""

    def __init__(self) -> None:
        self.prof, self.start, self.wall = profile(activities=[ProfilerActivity.CPU]), None, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == WARMUP - 1:
            self.prof.__enter__()
            self.start = time.perf_counter()
        elif batch_idx == WARMUP + STEPS - 1:
            self.wall = time.perf_counter() - self.start
            self.prof.__exit__(None, None, None)


def project(overrides: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = bench.compose_config([*overrides, *bench.BENCH, f"trainer.limit_train_batches={WARMUP + STEPS}"], run_dir)
        prof = Profile()
        datamodule, model, trainer = bench.build(cfg, extra_callbacks=[prof])
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            trainer.fit(model, datamodule=datamodule)
    return split(prof.prof, prof.wall, STEPS)


def plain(overrides: list[str]) -> dict[str, float]:
    cfg = bench.compose_config(overrides, "unused")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    prof = profile(activities=[ProfilerActivity.CPU])
    chars_per_sec, _ = bench.plain_loop(cfg, datamodule.ids["train"], len(datamodule.vocab), STEPS, WARMUP,
                                        at_start=prof.__enter__)
    prof.__exit__(None, None, None)
    return split(prof, STEPS * cfg.data.batch_size * cfg.data.seq_len / chars_per_sec, STEPS)


def main() -> None:
    overrides = sys.argv[1:]
    rows = {"plain": plain([o for o in overrides if "precision" not in o]), "project": project(overrides)}
    cols = list(rows["plain"])
    print(f"ms per step, {STEPS} steps after {WARMUP} ({' '.join(overrides) or 'the course configuration'}):")
    print(f"{'':10}" + "".join(f"{c:>17}" for c in cols))
    for name, row in rows.items():
        print(f"{name:10}" + "".join(f"{row[c]:17.2f}" for c in cols))


if __name__ == "__main__":
    main()
