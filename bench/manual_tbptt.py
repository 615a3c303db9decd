"""What Lightning's own TBPTT recipe would buy at the course's tiny steps, against the plain loop.

    python bench/manual_tbptt.py            # the course's configuration, K = 1 and 10 windows per training_step

Lightning 2.x does truncated BPTT with manual optimisation: each `training_step` gets K consecutive BPTT
windows and steps the optimiser after each, so the framework's per-step cost is paid once per K windows.
`ManualTBPTT` is that recipe on the project's LanguageModel (the raw optimiser, the project's clipping, the same
carried state and token-weighted NLL); it is a measurement, not the project's training path: it would
change what a step, `log_every_n_steps`, `max_steps`, resume points and `trainer.gradient_clip_val` mean.
Same alternation and ratio (median over rounds of variant / plain) as bench/throughput.py, but all in
one process (see docs/performance.md, "One process per run"): compare its figures within a run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as bench  # noqa: E402
from charlm.model import detach  # noqa: E402
from charlm.optim import clip_grad_norm  # noqa: E402
from charlm.module import LanguageModel  # noqa: E402


class ManualTBPTT(LanguageModel):
    """Splits each batch (K windows side by side in time) into its windows; one optimiser step per window."""

    def __init__(self, windows: int, clip: float, **hparams):
        super().__init__(**hparams)
        self.automatic_optimization = False
        self.windows, self.clip = windows, clip

    def training_step(self, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self.train_state = None
        opt = self.optimizers().optimizer  # the raw optimiser: no Lightning hooks per window
        for x, y in zip(*(part.chunk(self.windows, dim=1) for part in batch)):
            loss, state = self._nll((x, y), self.train_state)
            self.train_state = detach(state)
            opt.zero_grad()
            loss.backward()
            clip_grad_norm(list(self.parameters()), self.clip)
            opt.step()
            self.nll["train_nll"].update(loss.detach(), y.numel())


def run_manual(overrides: list[str], windows: int, steps: int, warmup: int, callbacks: list = ()) -> float:
    """Characters per second of `steps` windows after `warmup`, K = `windows` per training_step: the project's
    run (bench/throughput.py) with K-times-longer batches, fitting ManualTBPTT instead of its module."""
    cfg = bench.compose_config(overrides, "unused")

    def manual(model: LanguageModel) -> ManualTBPTT:
        rng = torch.get_rng_state()  # the same weights and, from here on, the same dropout masks as the project
        module = ManualTBPTT(windows, cfg.trainer.gradient_clip_val, **model.hparams)
        module.load_state_dict(model.state_dict())
        torch.set_rng_state(rng)
        return module

    return bench.run_project([*overrides, f"data.seq_len={cfg.data.seq_len * windows}", "trainer.gradient_clip_val=null"],
                             steps // windows, max(1, warmup // windows), "cpu", callbacks, module=manual)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 10], help="K windows per training_step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="timed windows of each variant")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (default: the course's configuration)")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = bench.compose_config(args.overrides, "unused")
    ntoken, train_ids = bench.train_split(cfg)
    runs = {"plain": lambda: bench.plain_loop(cfg, train_ids, ntoken, args.steps, 20)[0],
            "project": lambda: bench.run_project(args.overrides, args.steps, 20, "cpu")}
    for k in args.windows:
        runs[f"manual K={k}"] = lambda k=k: run_manual(args.overrides, k, args.steps, 20)
    cps = bench.alternate(runs, args.rounds, "course" if not args.overrides else " ".join(args.overrides))
    for name in runs:
        print(f"{name:14s} {statistics.median(cps[name]):10,.0f} chars/s   / plain {bench.ratio_to_plain(cps, name):.2f}")


if __name__ == "__main__":
    main()
