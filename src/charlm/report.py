"""The report of a sweep: summary.csv, summary.md and PNG plots in the sweep directory, one row per job,
read from what the jobs wrote (`.hydra/` and metrics.json); nothing typed by hand.

    python -m charlm.report outputs/multiruns/<time> [--x data.seq_len] [--group model.dropout]

Hydra writes it at the end of every multirun through `SweepReport` (hydra.callbacks, conf/hydra/default.yaml).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from charlm import devices, sweep
from charlm.errors import CharlmError, exit_on_error
from charlm.files import atomic_write, write_json
from charlm.sweep import PRUNED, SEARCH
from charlm.symbols import kind as symbol_kind

log = logging.getLogger(__name__)
NAMES = {"bpc": "bpc", "ppl": "perplexity"}  # a headline figure as the report's headings spell it
UNITS = {"bpc": "bits per character", "ppl": "perplexity per word"}
PLANNED = "planned.json"  # in a grid sweep's directory: every job's overrides, so jobs not yet started show


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _diverged(best, headline: str, vocab_path: Path) -> str | None:
    """Why a completed job counts as diverged: its best valid figure is not finite, or worse than the uniform
    guess over the vocabulary that the initial model already makes (log2 V bits, perplexity V); else None."""
    if not _finite(best):
        return f"the best valid {headline} is {best}"
    if vocab_path.is_file():
        size = len(json.loads(vocab_path.read_text(encoding="utf-8")))
        chance = math.log2(size) if headline == "bpc" else float(size)
        if best > chance:
            return f"the best valid {headline} {best:.4g} is worse than a uniform guess ({chance:.4f})"
    return None


def load_job(job_dir: Path) -> dict:
    """One job's row, plus its composed config and per-epoch history for the plots. The row holds the
    job's headline figure (its kind of symbol's: bpc for characters and text, perplexity for words)."""
    hydra_dir = job_dir / ".hydra"
    cfg = OmegaConf.load(hydra_dir / "config.yaml")
    num = OmegaConf.select(OmegaConf.load(hydra_dir / "hydra.yaml"), "hydra.job.num", default=None)
    overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
    m = sweep.read_metrics(job_dir)
    if m is None:
        interrupted = {"status": "interrupted", "reason": "no metrics.json: killed before its end; run the "
                                                          "sweep's command again to resume it from its last.ckpt"}
        m = {"status": "running"} if sweep.is_running(job_dir) else interrupted
    if m.get("status") == "completed" and (job_dir / PRUNED).is_file():
        m = {**m, "status": "pruned", "reason": "pruned: its valid curve was behind the study's median"}
    level = m.get("level")  # the run writes it; a job that has not ended has no figure to headline
    headline = symbol_kind(level).headline if level else None
    if m.get("status") == "completed":
        diverged = _diverged(m.get(f"best_valid_{headline}"), headline, job_dir / "vocab.json")
        if diverged:
            m.update(status="failed", reason=f"diverged: {diverged}")
    held = job_dir / "device.json"  # written by a job of hydra/launcher=parallel
    device = json.loads(held.read_text()).get("device") if held.is_file() else None
    test = m.get("test") or {}
    figures = {f"best_valid_{headline}": m.get(f"best_valid_{headline}"), f"test_{headline}": test.get(headline)}
    row = {"job": num, "overrides": " ".join(overrides), "status": m.get("status"), "level": level,
           **(figures if headline else {}), "test_ppl56": test.get("ppl56"), "epochs": m.get("epochs"), "wall_time_s": m.get("wall_time_s"),
           "device": device, "reason": m.get("reason"), "dir": str(job_dir)}
    return {"row": row, "overrides": overrides, "cfg": cfg, "history": m.get("history") or [], "headline": headline}


def headlines(jobs: list[dict]) -> list[str]:
    """The headline figures of the sweep's jobs: one, unless the sweep mixes data levels."""
    return list(dict.fromkeys(j["headline"] for j in jobs if j["headline"]))


def pending_jobs(sweep_dir: Path, jobs: list[dict]) -> list[dict]:
    """The grid's jobs (planned.json, written when a grid sweep starts) that have no directory yet."""
    planned = sweep_dir / PLANNED
    if not planned.is_file():
        return []
    started = {tuple(sorted(j["overrides"])) for j in jobs}
    rows = []
    for num, overrides in enumerate(json.loads(planned.read_text())):
        if tuple(sorted(overrides)) not in started:
            row = dict.fromkeys(columns(jobs), None) | {"job": num, "overrides": " ".join(overrides), "status": "pending"}
            rows.append({"row": row, "overrides": overrides, "cfg": OmegaConf.create(), "history": [], "headline": None})
    return rows


def grid(config: DictConfig) -> list[list[str]]:
    """Every job's overrides of a grid sweep, in Hydra's basic sweeper's order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    choices: dict = {}  # a key given twice: the last one counts, at the first one's place
    for o in OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task]):
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices[key] = [f"{key}={v}" for v in values]
    return [list(job) for job in itertools.product(*choices.values())]


def columns(jobs: list[dict]) -> list[str]:
    figures = [f"{kind}_{h}" for h in headlines(jobs) for kind in ("best_valid", "test")]
    figures += ["test_ppl56"] if any(j["row"]["level"] == "char" for j in jobs) else []
    return ["job", "overrides", "status", "level", *figures, "epochs", "wall_time_s", "device", "reason", "dir"]


def find_jobs(sweep_dir: Path) -> list[dict]:
    """Every job directory under the sweep (the ones Hydra gave a `.hydra/`), in job order."""
    jobs = [load_job(d.parent) for d in Path(sweep_dir).rglob(".hydra") if (d / "overrides.yaml").is_file()]
    return sorted(jobs, key=lambda j: (j["row"]["job"] is None, j["row"]["job"] or 0, j["row"]["dir"]))


def _label(job: dict, common: set[str]) -> str:
    varying = [o for o in job["overrides"] if o not in common and not o.startswith("trial=")]
    return " ".join(varying) or f"job {job['row']['job']}"


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e7 else f"{x:.4g}"
    return str(x)


def write_csv(jobs: list[dict], path: Path) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns(jobs), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(j["row"] for j in jobs)
    atomic_write(path, out.getvalue().encode())


def write_markdown(jobs: list[dict], common: set[str], plots: list[str], path: Path, sweep: dict,
                   search: dict | None = None) -> None:
    order = ["completed", "pruned", "running", "pending", "interrupted", "skipped", "failed"]
    statuses = sorted({j["row"]["status"] for j in jobs}, key=lambda s: order.index(s) if s in order else len(order))
    counts = {s: sum(j["row"]["status"] == s for j in jobs) for s in statuses}
    failed = [j for j in jobs if j["row"]["status"] not in ("completed", "running", "pruned", "pending")]
    best = (search or {}).get("best") or {}
    lines = [f"# Sweep {path.parent.name}", "",
             f"{len(jobs)} jobs: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + "."]
    if _finite(sweep.get("wall_time_s")):
        lines[-1] += f" Wall time of the sweep: {sweep['wall_time_s']:.1f} s."
    if sweep.get("command"):
        lines += ["", f"Command: `{sweep['command']}`"]
    if common:
        lines += ["", "Overrides of every job: " + " ".join(f"`{o}`" for o in sorted(common))]
    if search:
        states = [t["state"] for t in search["trials"]]
        lines += ["", f"Optuna study `{search['study']}`: {len(states)} trials ("
                  + ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)) + ")."]
    if best:
        values = " ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`" for k, v in best["params"].items())
        lines += [f"Best: trial {best['number']}, {best['value']:.4f}, with {values}; it trains with", "",
                  f"    {best['command']}"]
    figures = headlines(jobs)
    if len(figures) > 1:
        levels = ", ".join(sorted({j["row"]["level"] for j in jobs if j["row"]["level"]}))
        lines += ["", f"This sweep mixes data levels ({levels}): bits per character and word perplexity are not "
                      f"comparable, so each job shows its own level's figure and no plot compares them."]
    char = any(j["row"]["level"] == "char" for j in jobs)
    heads = [f"{kind} {NAMES[h]}" for h in figures for kind in ("best valid", "test")] + ["test ppl56"] * char
    lines += ["", "| job | overrides | status | " + " | ".join(heads) + " | epochs | wall time (s) | device |",
              "|---:|---|---|" + "---:|" * len(heads) + "---:|---:|---|"]
    for j in jobs:
        r = j["row"]
        cells = [_fmt(r.get(f"{kind}_{h}")) for h in figures for kind in ("best_valid", "test")]
        cells += [_fmt(r.get("test_ppl56"), 2)] * char
        status = f"{r['status']}, best" if best and r["job"] == best["number"] else r["status"]
        lines.append(f"| {_fmt(r['job'])} | {_label(j, common)} | {status} | " + " | ".join(cells)
                     + f" | {_fmt(r['epochs'])} | {_fmt(r['wall_time_s'], 1)} | {_fmt(r['device'])} |")
    if failed:
        lines += ["", "Jobs that did not complete:", ""]
        for j in failed:
            reason = " ".join((j["row"]["reason"] or "").split())
            lines.append(f"- job {_fmt(j['row']['job'])} ({_label(j, common)}): {reason[:300]}")
    lines += [""] + [f"![{p}]({p})" for p in plots]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def plot_final(jobs: list[dict], path: Path, x: str, group: str) -> bool:
    """The best valid headline figure against the config value `x`, one line per value of `group`."""
    from matplotlib.figure import Figure

    (headline,) = headlines(jobs)
    lines: dict = {}
    for j in jobs:
        xv, gv = OmegaConf.select(j["cfg"], x, default=None), OmegaConf.select(j["cfg"], group, default=None)
        y = j["row"].get(f"best_valid_{headline}")
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
    ax.set(xlabel=x, ylabel=f"best valid {NAMES[headline]}", title=f"best valid {NAMES[headline]} against {x}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return True


def plot_curves(jobs: list[dict], common: set[str], path: Path) -> bool:
    """The running train and the valid headline figure of every completed job at each validation, against the
    symbols trained on."""
    from matplotlib.figure import Figure

    (headline,) = headlines(jobs)
    curves = [j for j in jobs
              if j["row"]["status"] == "completed" and any(f"valid/{headline}" in h for h in j["history"])]
    if not curves:
        return False
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for j in curves:
        symbols_per_step = OmegaConf.select(j["cfg"], "data.batch_size") * OmegaConf.select(j["cfg"], "data.seq_len")
        for ax, key in zip(axes, (f"train/{headline}", f"valid/{headline}")):
            points = [(h["step"] * symbols_per_step / 1e6, h[key]) for h in j["history"] if key in h]
            if points:
                ax.plot(*zip(*points), marker=".", label=_label(j, common))
    name = NAMES[headline]
    for ax, title in zip(axes, (f"train {name} (running mean over the epoch)", f"valid {name}")):
        ax.set(xlabel="training symbols (millions)", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(UNITS[headline])
    axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.savefig(path, dpi=120)
    return True


def write(sweep_dir: Path, x: str = "data.seq_len", group: str = "model.dropout") -> list[dict]:
    """Write summary.csv, summary.md and the plots into `sweep_dir`; return the jobs' rows."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise CharlmError(f"{sweep_dir} is not a directory; give the sweep directory (outputs/multiruns/<time>)")
    jobs = find_jobs(sweep_dir)
    jobs += pending_jobs(sweep_dir, jobs)
    if not jobs:
        raise CharlmError(f"{sweep_dir} holds no job directories (with .hydra/overrides.yaml); give a sweep directory")
    common = set.intersection(*(set(j["overrides"]) for j in jobs)) if len(jobs) > 1 else set()
    sweep = json.loads((sweep_dir / "sweep.json").read_text()) if (sweep_dir / "sweep.json").is_file() else {}
    plots = []
    if len(headlines(jobs)) == 1:  # figures of different levels are not put on one axis
        final = f"valid_{jobs[0]['headline']}.png"
        if plot_final(jobs, sweep_dir / final, x, group):
            plots.append(final)
        if plot_curves(jobs, common, sweep_dir / "learning_curves.png"):
            plots.append("learning_curves.png")
    write_csv(jobs, sweep_dir / "summary.csv")
    search = json.loads((sweep_dir / SEARCH).read_text()) if (sweep_dir / SEARCH).is_file() else None
    write_markdown(jobs, common, plots, sweep_dir / "summary.md", sweep, search)
    return [j["row"] for j in jobs]


class SweepReport(Callback):
    """Hydra callback: the report rewritten each time a job ends (in the job's process, one writer at a time)
    and when the multirun ends, timed; exit 1 then if any job did not complete."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()
        sweep_dir = Path(config.hydra.sweep.dir)
        (sweep_dir / sweep.FAILED).unlink(missing_ok=True)  # fail_fast counts this launch
        if str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):  # a grid: its jobs are known
            sweep_dir.mkdir(parents=True, exist_ok=True)
            write_json(sweep_dir / PLANNED, grid(config))

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        if not devices.in_sweep():
            return
        sweep_dir = Path(HydraConfig.get().sweep.dir)
        try:
            with open(sweep_dir / ".report.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                write(sweep_dir)
        except Exception as e:  # a report that cannot be written must not fail the job
            log.warning(f"the sweep report was not rewritten: {e}")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        started = getattr(self, "started", None)
        sweep = {"command": " ".join(["python", *sys.argv]), "started": started, "ended": time.time(),
                 "wall_time_s": round(time.time() - started, 3) if started else None}
        write_json(sweep_dir / "sweep.json", sweep)
        rows = write(sweep_dir)
        failed = [r for r in rows if r["status"] not in ("completed", "pruned")]
        if (sweep_dir / SEARCH).is_file() and any(r["status"] == "completed" for r in rows):
            failed = []  # a search's failed trials (a diverging lr) are results; it fails when none completed
        (sweep_dir / ".report.lock").unlink(missing_ok=True)
        log.info(f"report: {sweep_dir / 'summary.md'}")
        if failed:
            log.error(f"{len(failed)} of {len(rows)} jobs failed: " + ", ".join(str(r["job"]) for r in failed)
                      + f" (see {sweep_dir / 'summary.md'})")
            sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m charlm.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--x", default="data.seq_len", help="config key on the x axis of valid_<figure>.png")
    parser.add_argument("--group", default="model.dropout", help="config key with one line per value")
    args = parser.parse_args(argv)
    with exit_on_error():
        write(args.sweep_dir, args.x, args.group)
    print((args.sweep_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
