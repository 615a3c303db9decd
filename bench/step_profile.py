"""Where a training step's time goes: the project's step and the plain loop's, under torch.profiler.

    python bench/step_profile.py                 # the course's configuration
    python bench/step_profile.py model.hidden_size=512 trainer.precision=bf16-mixed   # any train.py overrides

Both loops of bench/throughput.py run the same steps under the profiler; each step's wall time is split
into the LSTM kernels (oneDNN or cuDNN, forward and backward), every other torch op, and the rest: Python,
the framework's and the loop's own. The profiler adds its own cost to every op, so the split is a guide
to where the time goes, and throughput.py (no profiler) the measure of how fast each loop is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as bench  # noqa: E402

STEPS, WARMUP = 100, 20
LSTM_KERNELS = ("rnn", "lstm")  # aten::mkldnn_rnn_layer(_backward), aten::_cudnn_rnn(_backward), ...


def split(prof, cfg, chars_per_sec: float) -> dict[str, float]:
    """ms per step: the whole step, the LSTM kernels, other torch ops (the self times of the ops), the rest."""
    step = cfg.data.batch_size * cfg.data.seq_len / chars_per_sec * 1e3
    lstm = other = 0.0
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        if any(k in e.key for k in LSTM_KERNELS):
            lstm += e.self_cpu_time_total / 1e3 / STEPS
        else:
            other += e.self_cpu_time_total / 1e3 / STEPS
    return {"step": step, "lstm": lstm, "other ops": other, "python and loop": step - lstm - other}


class Profile(L.Callback):
    """Profiles the timed steps: from the batch end where throughput.py's clock starts to the epoch's end."""

    def __init__(self) -> None:
        self.prof = profile(activities=[ProfilerActivity.CPU])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == WARMUP - 1:
            self.prof.__enter__()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.prof.__exit__(None, None, None)


def project(overrides: list[str]) -> dict[str, float]:
    callback = Profile()
    chars_per_sec = bench.run_project(overrides, STEPS, WARMUP, "cpu", callbacks=[callback])
    return split(callback.prof, bench.compose_config(overrides, "unused"), chars_per_sec)


def plain(overrides: list[str]) -> dict[str, float]:
    prof = profile(activities=[ProfilerActivity.CPU])
    chars_per_sec = bench.run_plain(overrides, STEPS, WARMUP, at_start=prof.__enter__)
    prof.__exit__(None, None, None)
    return split(prof, bench.compose_config(overrides, "unused"), chars_per_sec)


def main() -> None:
    overrides = sys.argv[1:]
    rows = {"plain": plain(overrides), "project": project(overrides)}
    cols = list(rows["plain"])
    print(f"ms per step, {STEPS} steps after {WARMUP} ({' '.join(overrides) or 'the course configuration'}):")
    print(f"{'':10}" + "".join(f"{c:>17}" for c in cols))
    for name, row in rows.items():
        print(f"{name:10}" + "".join(f"{row[c]:17.2f}" for c in cols))


if __name__ == "__main__":
    main()
