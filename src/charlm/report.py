"""The report of a sweep: summary.csv, summary.md and PNG plots in the sweep directory, one row per job,
read from what the jobs wrote (`.hydra/` and metrics.json); nothing typed by hand.

    python -m charlm.report outputs/multiruns/<time> [--x data.seq_len] [--group model.dropout]

Hydra writes it at the end of every multirun through `SweepReport` (hydra.callbacks, conf/hydra/default.yaml).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from charlm.errors import CharlmError
from charlm.ptb import atomic_write

log = logging.getLogger(__name__)
COLUMNS = ("job", "overrides", "status", "best_valid_bpc", "test_bpc", "test_ppl56", "epochs", "wall_time_s",
           "device", "reason", "dir")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _diverged(best_bpc, vocab_path: Path) -> str | None:
    """Why a completed job counts as diverged: its best valid bpc is not finite, or worse than the uniform
    guess over the vocabulary that the initial model already makes (log2 V bits); else None."""
    if not _finite(best_bpc):
        return f"the best valid bpc is {best_bpc}"
    if vocab_path.is_file():
        chance = math.log2(len(json.loads(vocab_path.read_text(encoding="utf-8"))))
        if best_bpc > chance:
            return f"the best valid bpc {best_bpc:.4g} is worse than a uniform guess ({chance:.4f})"
    return None


def load_job(job_dir: Path) -> dict:
    """One job's row, plus its composed config and per-epoch history for the plots."""
    hydra_dir = job_dir / ".hydra"
    cfg = OmegaConf.load(hydra_dir / "config.yaml")
    num = OmegaConf.select(OmegaConf.load(hydra_dir / "hydra.yaml"), "hydra.job.num", default=None)
    overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
    path = job_dir / "metrics.json"
    m = json.loads(path.read_text()) if path.is_file() else {
        "status": "failed", "reason": "no metrics.json: the job never ran to its end (killed, or still running)"}
    if m.get("status") == "completed":
        diverged = _diverged(m.get("best_valid_bpc"), job_dir / "vocab.json")
        if diverged:
            m.update(status="failed", reason=f"diverged: {diverged}")
    held = job_dir / "device.json"  # written by a job of hydra/launcher=parallel
    device = json.loads(held.read_text()).get("device") if held.is_file() else None
    test = m.get("test") or {}
    row = {"job": num, "overrides": " ".join(overrides), "status": m.get("status"),
           "best_valid_bpc": m.get("best_valid_bpc"), "test_bpc": test.get("bpc"), "test_ppl56": test.get("ppl56"),
           "epochs": m.get("epochs"), "wall_time_s": m.get("wall_time_s"), "device": device,
           "reason": m.get("reason"), "dir": str(job_dir)}
    return {"row": row, "overrides": overrides, "cfg": cfg, "history": m.get("history") or []}


def find_jobs(sweep_dir: Path) -> list[dict]:
    """Every job directory under the sweep (the ones Hydra gave a `.hydra/`), in job order."""
    jobs = [load_job(d.parent) for d in Path(sweep_dir).rglob(".hydra") if (d / "overrides.yaml").is_file()]
    return sorted(jobs, key=lambda j: (j["row"]["job"] is None, j["row"]["job"] or 0, j["row"]["dir"]))


def _label(job: dict, common: set[str]) -> str:
    varying = [o for o in job["overrides"] if o not in common]
    return " ".join(varying) or f"job {job['row']['job']}"


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e7 else f"{x:.4g}"
    return str(x)


def write_csv(jobs: list[dict], path: Path) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(j["row"] for j in jobs)
    atomic_write(path, out.getvalue().encode())


def write_markdown(jobs: list[dict], common: set[str], plots: list[str], path: Path, sweep: dict) -> None:
    failed = [j for j in jobs if j["row"]["status"] != "completed"]
    lines = [f"# Sweep {path.parent.name}", "",
             f"{len(jobs)} jobs: {len(jobs) - len(failed)} completed, {len(failed)} failed."]
    if _finite(sweep.get("wall_time_s")):
        lines[-1] += f" Wall time of the sweep: {sweep['wall_time_s']:.1f} s."
    if sweep.get("command"):
        lines += ["", f"Command: `{sweep['command']}`"]
    if common:
        lines += ["", "Overrides of every job: " + " ".join(f"`{o}`" for o in sorted(common))]
    lines += ["",
              "| job | overrides | status | best valid bpc | test bpc | test ppl56 | epochs | wall time (s) | device |",
              "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for j in jobs:
        r = j["row"]
        lines.append(f"| {_fmt(r['job'])} | {_label(j, common)} | {r['status']} | {_fmt(r['best_valid_bpc'])} | "
                     f"{_fmt(r['test_bpc'])} | {_fmt(r['test_ppl56'], 2)} | {_fmt(r['epochs'])} | "
                     f"{_fmt(r['wall_time_s'], 1)} | {_fmt(r['device'])} |")
    if failed:
        lines += ["", "Failed jobs:", ""]
        for j in failed:
            reason = " ".join((j["row"]["reason"] or "").split())
            lines.append(f"- job {_fmt(j['row']['job'])} ({_label(j, common)}): {reason[:300]}")
    lines += [""] + [f"![{p}]({p})" for p in plots]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def plot_final(jobs: list[dict], path: Path, x: str, group: str) -> bool:
    """Best valid bpc against the config value `x`, one line per value of `group`."""
    from matplotlib.figure import Figure

    lines: dict = {}
    for j in jobs:
        xv, gv, y = OmegaConf.select(j["cfg"], x), OmegaConf.select(j["cfg"], group), j["row"]["best_valid_bpc"]
        if j["row"]["status"] == "completed" and _finite(xv) and _finite(y):
            lines.setdefault(gv, []).append((xv, y))
    if not lines:
        return False
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for gv, points in sorted(lines.items(), key=lambda kv: str(kv[0])):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=f"{group}={gv}")
    ticks = sorted({p[0] for points in lines.values() for p in points})
    if min(ticks) > 0 and max(ticks) / min(ticks) >= 8:
        ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel=x, ylabel="best valid bpc", title=f"best valid bpc against {x}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return True


def plot_curves(jobs: list[dict], common: set[str], path: Path) -> bool:
    """Running train bpc and valid bpc of every completed job at each validation, against the symbols trained on."""
    from matplotlib.figure import Figure

    curves = [j for j in jobs if j["row"]["status"] == "completed" and any("valid/bpc" in h for h in j["history"])]
    if not curves:
        return False
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for j in curves:
        symbols_per_step = OmegaConf.select(j["cfg"], "data.batch_size") * OmegaConf.select(j["cfg"], "data.seq_len")
        for ax, key in zip(axes, ("train/bpc", "valid/bpc")):
            points = [(h["step"] * symbols_per_step / 1e6, h[key]) for h in j["history"] if key in h]
            if points:
                ax.plot(*zip(*points), marker=".", label=_label(j, common))
    for ax, title in zip(axes, ("train bpc (running mean over the epoch)", "valid bpc")):
        ax.set(xlabel="training symbols (millions)", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits per character")
    axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.savefig(path, dpi=120)
    return True


def write(sweep_dir: Path, x: str = "data.seq_len", group: str = "model.dropout") -> list[dict]:
    """Write summary.csv, summary.md and the plots into `sweep_dir`; return the jobs' rows."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise CharlmError(f"{sweep_dir} is not a directory; give the sweep directory (outputs/multiruns/<time>)")
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise CharlmError(f"{sweep_dir} holds no job directories (with .hydra/overrides.yaml); give a sweep directory")
    common = set.intersection(*(set(j["overrides"]) for j in jobs)) if len(jobs) > 1 else set()
    sweep = json.loads((sweep_dir / "sweep.json").read_text()) if (sweep_dir / "sweep.json").is_file() else {}
    plots = []
    if plot_final(jobs, sweep_dir / "valid_bpc.png", x, group):
        plots.append("valid_bpc.png")
    if plot_curves(jobs, common, sweep_dir / "learning_curves.png"):
        plots.append("learning_curves.png")
    write_csv(jobs, sweep_dir / "summary.csv")
    write_markdown(jobs, common, plots, sweep_dir / "summary.md", sweep)
    return [j["row"] for j in jobs]


class SweepReport(Callback):
    """Hydra callback: when a multirun ends, time it and write its report; exit 1 if any job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        started = getattr(self, "started", None)
        sweep = {"command": " ".join(["python", *sys.argv]), "started": started, "ended": time.time(),
                 "wall_time_s": round(time.time() - started, 3) if started else None}
        atomic_write(sweep_dir / "sweep.json", (json.dumps(sweep, indent=2) + "\n").encode())
        rows = write(sweep_dir)
        failed = [r for r in rows if r["status"] != "completed"]
        log.info(f"report: {sweep_dir / 'summary.md'}")
        if failed:
            log.error(f"{len(failed)} of {len(rows)} jobs failed: " + ", ".join(str(r["job"]) for r in failed)
                      + f" (see {sweep_dir / 'summary.md'})")
            sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m charlm.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--x", default="data.seq_len", help="config key on the x axis of valid_bpc.png")
    parser.add_argument("--group", default="model.dropout", help="config key with one line per value")
    args = parser.parse_args(argv)
    try:
        write(args.sweep_dir, args.x, args.group)
    except CharlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print((args.sweep_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
