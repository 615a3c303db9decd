"""Time from `python train.py` to the end of its first training step (imports, config, data, model, sanity check).

    python bench/first_step.py [--runs 3] [--no-cache] [train.py overrides...]

Each run is a fresh `python train.py` that stops right after its first step (a callback from this file
exits the process). `--no-cache` re-reads and tokenises the text files in every run, as the project did
before it cached them; without it one untimed run first makes sure the cache is there.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


class ExitAtFirstStep(L.Callback):
    """Prints the wall clock at the end of the first training step, then ends the process at once."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"\nfirst_step_at={time.time():.6f}", flush=True)
        os._exit(0)


def time_first_step(overrides: list[str], env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}",
                               f"+callbacks.first_step._target_={__name__ if __name__ != '__main__' else 'first_step'}.ExitAtFirstStep",
                               *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    stamps = re.findall(r"^first_step_at=([0-9.]+)$", proc.stdout, re.M)
    if proc.returncode != 0 or not stamps:
        sys.exit(f"train.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(stamps[-1]) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-cache", action="store_true", help="tokenise the text files in every run (data.cache=false)")
    args, overrides = parser.parse_known_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]))
    if args.no_cache:
        overrides.append("data.cache=false")
    else:
        time_first_step(overrides, env)  # fills the cache if it is empty or stale
    times = []
    for _ in range(args.runs):
        times.append(time_first_step(overrides, env))
        print(f"first step after {times[-1]:.2f} s", flush=True)
    print(f"time_to_first_step_s={statistics.median(times):.2f} "
          f"(median of {args.runs}, {'no token cache' if args.no_cache else 'token cache'})")

if __name__ == "__main__":
    main()
