"""One training run from a composed config: fit, test on the best checkpoint, write metrics.json."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from charlm import checkpoint, config, devices, metrics
from charlm.callbacks import History, SaveOnInterrupt
from charlm.errors import CharlmError
from charlm.ptb import atomic_write

SPLITS = ("train", "valid", "test")
log = logging.getLogger(__name__)


@rank_zero_only  # under DDP every rank holds the same synced metrics; one writes them
def write_metrics(run_dir: Path, result: dict) -> None:
    atomic_write(run_dir / "metrics.json", (json.dumps(result, indent=2) + "\n").encode())


def format_table(result: dict) -> str:
    rows = {split: result[split] for split in SPLITS if result.get(split)}
    names = list(next(iter(rows.values()), {}))
    lines = [f"{'split':<6}" + "".join(f" {n:>10}" for n in names)]
    lines += [f"{split:<6}" + "".join(f" {m[n]:10.4f}" for n in names) for split, m in rows.items()]
    return "\n".join(lines)


def _resume_hint() -> str:
    args = [a for a in sys.argv[1:] if not a.startswith("ckpt_path=")]
    return shlex.join(["python", "train.py", *args])


def configure_torch(cfg: DictConfig) -> None:
    """The process-wide settings of a run (`cpu.*`)."""
    if OmegaConf.select(cfg, "cpu.threads"):
        torch.set_num_threads(cfg.cpu.threads)
    torch.set_flush_denormal(bool(OmegaConf.select(cfg, "cpu.flush_denormal", default=False)))
    if OmegaConf.select(cfg, "cpu.keep_freed_memory", default=False):
        keep_freed_memory()


# glibc's mallopt parameters (malloc.h) and the values set: the largest mmap threshold it accepts on 64-bit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a training step frees for the next step, as torch's CUDA caching
    allocator does on a GPU. By default it returns freed memory to the OS whenever a few MB lie free at the
    top of its heap, and maps large blocks afresh, so each step faults its temporaries' pages in again, one
    fault per 4 KB: ~8,000 a step at 2x512, a third of the step (docs/performance.md). Now blocks up to
    32 MB come from the heap, and up to 1 GB of freed heap is kept. Returns whether it applied (glibc only)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler, which profiles nothing, without its cost: it enters a generator-based
    context manager around every hook, about 130 a training step at 0.8 us each, 1% of the course's step.
    `trainer.profiler=simple` (or advanced, pytorch) replaces it with a real one."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._nothing


def build(cfg: DictConfig, extra_callbacks: list = ()) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """The seeded data, model and trainer of one run as `cfg` says (bench/throughput.py times the same)."""
    configure_torch(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if cfg.get("ckpt_path"):
        checkpoint.check_vocab(checkpoint.read(cfg.ckpt_path), datamodule.vocab.symbols, cfg.ckpt_path)
    model = hydra.utils.instantiate(cfg.model, vocab=datamodule.vocab.symbols, optimizer=cfg.optimizer,
                                    scheduler=cfg.get("scheduler"), level=datamodule.level, _recursive_=False)
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    callbacks += [*extra_callbacks, SaveOnInterrupt(str(ckpt_dir / "last.ckpt"), _resume_hint())]
    every = OmegaConf.select(cfg, "checkpoint.every_n_train_steps")
    if every:  # a rolling step checkpoint (and last.ckpt) every N steps, for pre-emptible machines
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step", every_n_train_steps=every,
                                         save_last=True, save_top_k=1, enable_version_counter=False))
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    # Lightning's barebones mode (the Trainer with nothing that costs, for measuring it) refuses any profiler
    profiler = cfg.trainer.get("profiler") or (None if cfg.trainer.get("barebones") else NoProfiler())
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 profiler=profiler,
                                                 plugins=[checkpoint.AtomicCheckpointIO()])
    return datamodule, model, trainer


def fit(cfg: DictConfig) -> dict:
    """Train and test as `cfg` says; returns what metrics.json holds. Raises CharlmError on bad input.

    Everything that can be checked is checked before anything is written; once training starts,
    metrics.json records the outcome, "failed" with the reason included.
    """
    started = time.time()
    run_dir = Path(cfg.run_dir)
    config.check(cfg)
    config.check_writable(run_dir, "hydra.run.dir")
    result: dict = {"status": "failed", "run_dir": str(run_dir)}
    history = History()
    training = False
    try:
        datamodule, model, trainer = build(cfg, extra_callbacks=[history])
        result["level"] = datamodule.level
        headline = metrics.HEADLINE[datamodule.level]  # bpc for characters, ppl for words
        hparams = OmegaConf.to_container(cfg, resolve=True)
        hparams = {k: hparams[k] for k in ("data", "model", "optimizer", "scheduler", "trainer", "seed") if k in hparams}
        training = True
        datamodule.vocab.save(run_dir / "vocab.json")
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams, metrics={f"valid/best_{headline}": math.nan})

        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if trainer.interrupted:
            raise KeyboardInterrupt
        result.update(train=model.results.get("train"), valid=model.results.get("valid"))
        epochs = list(history.epochs)  # trainer.test(ckpt_path=best) restores callbacks to the best epoch
        if cfg.get("test", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
            result["test"] = model.results.get("test")
        result.update(status="completed", epochs=trainer.current_epoch, steps=trainer.global_step)
        result[f"best_valid_{headline}"] = model.best_valid if math.isfinite(model.best_valid) else None
        history.epochs = epochs
    except BaseException as e:
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))  # Lightning exits on Ctrl-C and SIGTERM
        result.update(reason="interrupted (SIGINT or SIGTERM)" if interrupted else str(e) or type(e).__name__)
        raise
    finally:
        # A run that failed before training leaves an existing metrics.json (an earlier run's) alone.
        if training or not (run_dir / "metrics.json").exists():
            result.update(wall_time_s=round(time.time() - started, 3), history=history.epochs)
            write_metrics(run_dir, result)
    print(format_table(result))
    print(f"metrics: {run_dir / 'metrics.json'}")
    return result


def main(cfg: DictConfig) -> float | None:
    """Entry point behind `python train.py`: a CharlmError becomes one line on stderr and exit code 2.

    A job of a sweep (`-m`) must not exit or raise: Hydra's launchers would stop the sweep, and its report
    would never be written. It records the failure in its metrics.json (status failed) and returns None.
    """
    try:
        with devices.claim(cfg):
            result = fit(cfg)
        return result[f"best_valid_{metrics.HEADLINE[result['level']]}"]
    except SIGTERMException:  # a SystemExit with no code, which would otherwise exit 0
        sys.exit(128 + signal.SIGTERM)
    except Exception as e:
        if devices.in_sweep():
            log.error(f"job failed: {e}", exc_info=not isinstance(e, CharlmError))
            run_dir = Path(cfg.run_dir)
            if not (run_dir / "metrics.json").exists():  # it failed before fit wrote one (a bad value)
                write_metrics(run_dir, {"status": "failed", "reason": str(e) or type(e).__name__,
                                        "run_dir": str(run_dir)})
            return None
        if isinstance(e, CharlmError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
