"""What a job of a sweep does beyond one run, so that a sweep survives: run again over the same sweep
directory, it keeps the jobs that completed, resumes the interrupted ones from their last.ckpt and runs
the failed ones again; its report is rewritten as each job ends; `sweep.fail_fast` stops it early.

A job's directory is named by its overrides (conf/hydra/default.yaml), so the same job finds its own
directory again however the grid around it has grown, and two jobs never share one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from charlm import checkpoint
from charlm.errors import CharlmError
from charlm.files import write_json

log = logging.getLogger(__name__)
FAILED = ".failed"  # a file in the sweep directory once a job of this launch failed (sweep.fail_fast)
RUNNING = "running.json"  # in a job's directory while it runs: its host and pid
PRUNED = "pruned.json"  # in a job's directory once the Optuna search stopped it (charlm.search.PruneTrial)
SEARCH = "search.json"  # in an Optuna search's directory: its trials, the best one and the command to train it


def sweep_dir() -> Path:
    return Path(HydraConfig.get().sweep.dir)


def read_metrics(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def is_running(run_dir: Path) -> bool:
    """Whether the job in `run_dir` is running now: its running.json names a live process of this host."""
    try:
        mark = json.loads((run_dir / RUNNING).read_text())
    except (OSError, ValueError):
        return False
    if mark.get("host") != socket.gethostname():
        return True  # another node's job: trust its mark
    return pid_alive(mark.get("pid"))


def pid_alive(pid) -> bool:
    """Whether a process of this host has the id `pid`."""
    try:
        os.kill(int(pid), 0)  # PermissionError: alive, another user's
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        pass
    return True


def set_aside(run_dir: Path) -> None:
    """Move an earlier attempt's files (all but Hydra's .hydra/ and its log, which every launch appends to)
    into attempts/<n>/: kept, out of the way."""
    old = [p for p in run_dir.iterdir() if p.name not in (".hydra", "attempts", "train.log")]
    if not old:
        return
    attempts = run_dir / "attempts"
    target = attempts / str(len(list(attempts.glob("*"))) + 1 if attempts.is_dir() else 1)
    target.mkdir(parents=True)
    for path in old:
        shutil.move(str(path), target / path.name)
    log.info(f"an earlier attempt of {run_dir.name} moved to {target}")


def plan(cfg: DictConfig) -> str:
    """What this job does, from what its directory already holds: "done", "skip" (sweep.fail_fast after a
    failure), "resume" (cfg.ckpt_path set to its last.ckpt) or "run" (from the start). Sets the sweep's
    default step checkpoints on cfg."""
    run_dir, sweep = Path(cfg.run_dir), cfg.get("sweep") or {}
    if cfg.checkpoint.get("every_n_train_steps") is None:  # what makes an interrupted job cheap to finish
        cfg.checkpoint.every_n_train_steps = sweep.get("every_n_train_steps")
    previous = read_metrics(run_dir)
    status = (previous or {}).get("status")
    if status == "completed":
        return "done"
    if sweep.get("fail_fast") and (sweep_dir() / FAILED).exists():
        return "skip"
    last = run_dir / "checkpoints" / "last.ckpt"
    interrupted = previous is None or "interrupted" in str(previous.get("reason", ""))
    if interrupted and last.is_file() and not cfg.get("ckpt_path"):
        if not trained_out(last, cfg.trainer.max_epochs):
            cfg.ckpt_path = str(last)
            return "resume"
        # killed after its last epoch, before its test and metrics.json: a resume would train nothing
        log.info(f"{run_dir.name} was killed after its last epoch, before its results: it runs again")
    if status == "failed" and not sweep.get("rerun_failed", True):
        return "keep failed"
    if status == "skipped":  # it never ran: nothing to keep
        (run_dir / "metrics.json").unlink()
    set_aside(run_dir)
    return "run"


def trained_out(path: Path, max_epochs) -> bool:
    """Whether the checkpoint at `path` has trained all of `max_epochs` (an unreadable one has not)."""
    try:
        return checkpoint.finished(checkpoint.read(path), max_epochs)
    except CharlmError:
        return False


def mark_running(run_dir: Path) -> None:
    write_json(run_dir / RUNNING, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})


def mark_ended(run_dir: Path, failed: bool) -> None:
    (run_dir / RUNNING).unlink(missing_ok=True)
    if failed:
        (sweep_dir() / FAILED).touch()
