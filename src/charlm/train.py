"""One training run from a composed config: fit, test on the best checkpoint, write metrics.json."""

from __future__ import annotations

import ctypes
import logging
import math
import platform
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from charlm import checkpoint, config, devices, precision, sweep
from charlm.budget import TimeBudget
from charlm.callbacks import History, SaveOnInterrupt
from charlm.errors import CharlmError, exit_on_error
from charlm.files import write_json
from charlm.module import LanguageModel
from charlm.ptb import SPLITS
from charlm.symbols import kind

log = logging.getLogger(__name__)
# Lightning's own _pytree builds torch's deprecated LeafSpec on every fit (lightning 2.6, torch 2.13): not
# the user's to act on, so not printed on every run
warnings.filterwarnings("ignore", r".isinstance\(treespec, LeafSpec\). is deprecated", FutureWarning,
                        "lightning.pytorch.utilities._pytree")
# Config keys that say where and how a run is carried out, not what it is: left out of TensorBoard's HPARAMS.
PLUMBING = {"_target_", "data_dir", "path", "download", "url", "verify", "cache", "default_root_dir", "accelerator",
            "devices", "num_nodes", "strategy", "enable_progress_bar", "enable_model_summary", "enable_checkpointing",
            "log_every_n_steps", "profiler", "num_sanity_val_steps", "use_distributed_sampler", "barebones",
            "_partial_"}


@rank_zero_only  # under DDP every rank holds the same synced metrics; one writes them
def write_metrics(run_dir: Path, result: dict) -> None:
    write_json(run_dir / "metrics.json", result)


def format_table(result: dict) -> str:
    """The end-of-run table, each row saying what it was scored with (train and valid: the last epoch; test:
    its checkpoint, best.ckpt), then the best valid figure: a run trained past its best shows both."""
    when = {"train": "last epoch, running", "valid": "last epoch", "test": result.get("test_checkpoint")}
    rows = {f"{split} ({when[split]})": result[split] for split in SPLITS if result.get(split)}
    names = list(next(iter(rows.values()), {}))
    width = max(map(len, rows), default=5)
    lines = [f"{'split':<{width}}" + "".join(f" {n:>10}" for n in names)]
    lines += [f"{row:<{width}}" + "".join(f" {m[n]:10.4f}" for n in names) for row, m in rows.items()]
    best = {k: v for k, v in result.items() if k.startswith("best_valid_") and v is not None}
    lines += [f"{k.replace('_', ' ')}: {v:.4f}" for k, v in best.items()]
    return "\n".join(lines)


def _resume_hint() -> str:
    args = [a for a in sys.argv[1:] if not a.startswith("ckpt_path=")]
    return shlex.join(["python", "train.py", *args])


def experiment_hparams(cfg: DictConfig) -> dict:
    """What defines a run, for comparing runs in TensorBoard's HPARAMS tab: each config group by the name it
    was chosen by (`optimizer: sgd`), and its values as `group/key` (`optimizer/lr`), less PLUMBING and unset
    values; lists as text."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    hparams: dict = {}
    if choices.get("experiment"):
        hparams["experiment"] = choices["experiment"]

    def add(prefix: str, node) -> None:
        for key, value in node.items():
            if key in PLUMBING or value is None:
                continue
            if isinstance(value, dict):
                add(f"{prefix}/{key}", value)
            else:
                hparams[f"{prefix}/{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

    for group in ("data", "model", "loss", "optimizer", "scheduler", "trainer"):
        if group not in cfg:
            continue
        node = OmegaConf.to_container(cfg[group], resolve=True) if cfg[group] is not None else None
        target = (node or {}).get("_target_", "none").rsplit(".", 1)[-1]
        hparams[group] = choices.get(group) or target
        add(group, node or {})
    hparams["seed"] = cfg.seed
    return hparams


def configure_torch(cfg: DictConfig) -> None:
    """The process-wide settings of a run (`cpu.*`)."""
    if OmegaConf.select(cfg, "cpu.threads"):
        torch.set_num_threads(cfg.cpu.threads)
    if OmegaConf.select(cfg, "cpu.keep_freed_memory", default=False):
        keep_freed_memory()


# glibc's mallopt parameters (malloc.h) and the values set: the largest mmap threshold it accepts on 64-bit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a training step frees for the next step, as torch's CUDA caching
    allocator does on a GPU (`cpu.keep_freed_memory`, on by default).

    Why: by default glibc returns freed memory to the OS whenever a few MB lie free at the top of its heap,
    and maps large blocks afresh, so each step faults its temporaries' pages in again, one fault per 4 KB:
    ~8,000 a step at 2x512, a third of the step (`python bench/throughput.py --tricks` measures it). Now
    blocks up to 32 MB come from the heap, and up to 1 GB of freed heap is kept. The numbers computed are
    the same. Returns whether it applied (glibc only)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def instantiate(node: DictConfig, key: str, **kwargs):
    """hydra.utils.instantiate, with a failure of the object's own constructor (a value it refuses) as one line
    naming the config key, instead of Hydra's block of "Error in call to target ..." and "full_key"."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, CharlmError):
            raise cause from None
        text = " ".join(str(cause).split()) or type(cause).__name__
        raise CharlmError(f"{key}: {text.rstrip('.!')}; change the {key}.* value it names") from None


def build(cfg: DictConfig, extra_callbacks: list = ()) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """The seeded data, model and trainer of one run as `cfg` says (bench/throughput.py times the same).
    Everything the data and a checkpoint to resume from can tell is checked before the model is built."""
    configure_torch(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("fit")
    if cfg.get("ckpt_path"):
        ckpt = checkpoint.read(cfg.ckpt_path)
        checkpoint.check_vocab(ckpt, datamodule.vocab.symbols, cfg.ckpt_path)
        checkpoint.check_unfinished(ckpt, cfg.trainer.max_epochs, cfg.ckpt_path)
    vocab = datamodule.vocab.symbols
    scheduler = cfg.get("scheduler")
    model = LanguageModel(instantiate(cfg.model, "model", vocab_size=len(vocab)), vocab, datamodule.kind,
                          optimizer=instantiate(cfg.optimizer, "optimizer"),
                          scheduler=instantiate(scheduler, "scheduler") if scheduler else None,
                          seq_len=datamodule.seq_len if datamodule.variable_length else None,
                          net_config=OmegaConf.to_container(cfg.model, resolve=True), **cfg.get("loss", {}))
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    loggers = [instantiate(c, "logger") for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c, "callbacks") for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning's switch takes the configured bar with it
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not loggers:  # logger=none: nothing to show a learning rate in
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks += [*extra_callbacks, SaveOnInterrupt(str(ckpt_dir / "last.ckpt"), _resume_hint())]
    every = OmegaConf.select(cfg, "checkpoint.every_n_train_steps")
    if every:  # a rolling step checkpoint (and last.ckpt) every N steps, for pre-emptible machines
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step", every_n_train_steps=every,
                                         save_last=True, save_top_k=1, enable_version_counter=False))
    plugins = [checkpoint.AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit requeues pre-empted jobs (hydra/launcher=slurm): Lightning must not too
        plugins.append(SLURMEnvironment(auto_requeue=False))
    # A TimeBudget ends the run inside trainer.max_time itself: Lightning's own stop at max_time would cut
    # its schedule short wherever the clock runs out
    budgeted = any(isinstance(c, TimeBudget) and c.budget for c in callbacks)
    trainer: L.Trainer = instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
                                     plugins=plugins, max_time=None if budgeted else cfg.trainer.get("max_time"),
                                     precision=precision.usable(cfg.trainer.precision, cfg.trainer.accelerator))
    return datamodule, model, trainer


def fit(cfg: DictConfig) -> dict:
    """Train and test as `cfg` says; returns what metrics.json holds. Raises CharlmError on bad input.

    Everything that can be checked is checked before anything is written; once training starts,
    metrics.json records the outcome, "failed" with the reason included.
    """
    started, clock = time.time(), time.monotonic()
    run_dir = Path(cfg.run_dir)
    config.check(cfg)
    config.check_writable(run_dir, "run_dir")  # made if missing: run_dir=PATH may name one Hydra did not make
    result: dict = {"status": "failed", "run_dir": str(run_dir)}
    history = History()
    training = False
    try:
        datamodule, model, trainer = build(cfg, extra_callbacks=[history])
        for budget in (c for c in trainer.callbacks if isinstance(c, TimeBudget)):
            budget.started = clock  # the run's time counts from here, its data's loading included
        result["level"] = datamodule.kind.name
        if getattr(datamodule, "data_dir", None) is not None:  # PTB's directory as this run resolved it (charlm.evaluate)
            result["data_dir"] = str(Path(datamodule.data_dir).resolve())
        headline = datamodule.kind.headline  # bpc for characters, ppl for words
        training = True
        datamodule.vocab.save(run_dir / "vocab.json")
        for logger in trainer.loggers:
            logger.log_hyperparams(experiment_hparams(cfg), metrics={f"valid/best_{headline}": math.nan})

        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if trainer.interrupted:
            raise KeyboardInterrupt
        result.update(train=model.results.get("train"), valid=model.results.get("valid"))
        epochs = list(history.epochs)  # trainer.test(ckpt_path=best) restores callbacks to the best epoch
        if cfg.get("test", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
            result["test"], result["test_checkpoint"] = model.results.get("test"), Path(best).name or "last weights"
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


def best_valid(result: dict) -> float | None:
    """A run's best valid headline figure (bpc, or ppl for words): what a sweep job returns to Hydra."""
    return result.get(f"best_valid_{kind(result['level']).headline}")


def main(cfg: DictConfig) -> float | None:
    """Entry point behind `python train.py`: a CharlmError becomes one line on stderr and exit code 2."""
    try:
        if devices.in_sweep():
            return sweep_job(cfg)
        with exit_on_error():
            return best_valid(fit(cfg))
    except SIGTERMException:  # a SystemExit with no code, which would otherwise exit 0
        sys.exit(128 + signal.SIGTERM)


def sweep_job(cfg: DictConfig) -> float | None:
    """One job of a sweep (`-m`), on a device of its own, as charlm.sweep plans it from what its directory
    holds: kept if it completed, resumed if it was interrupted, run again if it failed. It must not exit or
    raise: Hydra's launchers would stop the sweep, and its report would never be written. It records a
    failure in its metrics.json (status failed) and returns None."""
    run_dir = Path(cfg.run_dir)
    todo = sweep.plan(cfg)
    if todo in ("done", "keep failed"):
        log.info(f"job {todo}, kept as it is: {run_dir}")
        return best_valid(sweep.read_metrics(run_dir)) if todo == "done" else None
    if todo == "skip":
        write_metrics(run_dir, {"status": "skipped", "reason": "sweep.fail_fast: an earlier job failed",
                                "run_dir": str(run_dir)})
        return None
    if todo == "resume":
        log.info(f"resuming the interrupted job from {cfg.ckpt_path}")
    sweep.mark_running(run_dir)
    failed = False  # an interruption (SystemExit: submitit's requeue, SIGTERM) is not a failure
    try:
        with devices.claim(cfg):
            return best_valid(fit(cfg))
    except Exception as e:
        failed = True
        log.error(f"job failed: {e}", exc_info=not isinstance(e, CharlmError))
        if not (run_dir / "metrics.json").exists():  # it failed before fit wrote one (a bad value)
            write_metrics(run_dir, {"status": "failed", "reason": str(e) or type(e).__name__, "run_dir": str(run_dir)})
        return None
    finally:
        sweep.mark_ended(run_dir, failed)
