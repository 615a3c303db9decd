"""Minor page faults a training step, and speed: the plain loop and the project (with and without
`cpu.keep_freed_memory`), each in a fresh process, or with --shared all in one process one after another.

    python bench/page_faults.py                          # 2x512, where glibc's defaults fault most
    python bench/page_faults.py --shared                 # one process, as bench/throughput.py ran before
    python bench/page_faults.py model.hidden_size=200    # any train.py overrides

A minor fault is the kernel handing the process a fresh 4 KB page (zeroed) on first touch: what glibc's
malloc costs when it has given a step's freed memory back to the OS and the next step allocates it again.
Counted with getrusage over the timed steps of bench/throughput.py's loops (Linux and macOS). --shared
leaves out the project with the setting on: once set, it holds for the rest of the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as bench  # noqa: E402

STEPS, WARMUP = 60, 10
VARIANTS = {"plain": [], "project": [], "project, keep_freed_memory off": ["cpu.keep_freed_memory=false"]}


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Count(L.Callback):
    """Faults from the batch end where throughput.py's clock starts to the last one's."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == WARMUP - 1:
            self.start = faults()
        self.end = faults()


def measure(variant: str, overrides: list[str]) -> dict:
    """Characters per second and faults per timed step of one run of `variant`, in this process."""
    if variant == "plain":
        start = []
        cps = bench.run_plain(overrides, STEPS, WARMUP, at_start=lambda: start.append(faults()))
        return {"chars_per_sec": cps, "faults_per_step": (faults() - start[0]) / STEPS}
    count = Count()
    cps = bench.run_project([*overrides, *VARIANTS[variant]], STEPS, WARMUP, "cpu", callbacks=[count])
    return {"chars_per_sec": cps, "faults_per_step": (count.end - count.start) / STEPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", action="store_true", help="every run in this one process, one after another")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single run in a fresh process: JSON in, JSON out
    parser.add_argument("overrides", nargs="*", default=["model.hidden_size=512"], help="train.py overrides")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    for r in range(args.rounds):
        for variant in VARIANTS:
            if args.shared and variant == "project":
                continue
            row = (measure(variant, args.overrides) if args.shared
                   else bench.in_fresh_process(__file__, [variant, args.overrides]))
            print(f"round {r + 1}  {variant:32s} {row['chars_per_sec']:9,.0f} chars/s "
                  f"{row['faults_per_step']:9,.0f} page faults a step", flush=True)


if __name__ == "__main__":
    main()
