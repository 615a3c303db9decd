"""One training run from a composed config: fit, test on the best checkpoint, write metrics.json."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from charlm import config, devices
from charlm.callbacks import History
from charlm.errors import CharlmError
from charlm.ptb import atomic_write

SPLITS = ("train", "valid", "test")
log = logging.getLogger(__name__)


@rank_zero_only  # under DDP every rank holds the same synced metrics; one writes them
def write_metrics(run_dir: Path, result: dict) -> None:
    atomic_write(run_dir / "metrics.json", (json.dumps(result, indent=2) + "\n").encode())


def format_table(result: dict) -> str:
    lines = [f"{'split':<6} {'nll':>8} {'bpc':>8} {'ppl':>8} {'ppl56':>10}"]
    for split in SPLITS:
        m = result.get(split)
        if m:
            lines.append(f"{split:<6} {m['nll']:8.4f} {m['bpc']:8.4f} {m['ppl']:8.3f} {m['ppl56']:10.3f}")
    return "\n".join(lines)


def fit(cfg: DictConfig) -> dict:
    """Train and test as `cfg` says; returns what metrics.json holds. Raises CharlmError on bad input."""
    config.check(cfg)
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write-test").touch()
        (run_dir / ".write-test").unlink()
    except OSError as e:
        raise CharlmError(f"cannot write the run directory {run_dir} ({e.strerror}); "
                          f"set hydra.run.dir to a writable place") from None
    started = time.time()
    result: dict = {"status": "running", "run_dir": str(run_dir)}
    history = History()
    try:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = hydra.utils.instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.vocab.save(run_dir / "vocab.json")
        model = hydra.utils.instantiate(cfg.model, vocab=datamodule.vocab.symbols, optimizer=cfg.optimizer,
                                        scheduler=cfg.get("scheduler"), _recursive_=False)
        callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + [history]
        loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
        trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        hparams = OmegaConf.to_container(cfg, resolve=True)
        hparams = {k: hparams[k] for k in ("data", "model", "optimizer", "scheduler", "trainer", "seed") if k in hparams}
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams, metrics={"valid/best_bpc": math.nan})

        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if trainer.interrupted:
            raise KeyboardInterrupt
        result.update(train=model.results.get("train"), valid=model.results.get("valid"))
        if cfg.get("test", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
            result["test"] = model.results.get("test")
        result.update(status="completed",
                      best_valid_bpc=model.best_valid_bpc if math.isfinite(model.best_valid_bpc) else None,
                      epochs=trainer.current_epoch, steps=trainer.global_step)
    except BaseException as e:
        result.update(status="failed", reason=str(e) or type(e).__name__)
        raise
    finally:
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
            return fit(cfg)["best_valid_bpc"]
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
