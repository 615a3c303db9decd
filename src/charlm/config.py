"""Checks of a composed config, before any work starts: a bad value is one line naming key and range."""

from __future__ import annotations

import re
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from charlm.errors import CharlmError, exit_on_error


def _int_at_least(low: int):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


def _number(test, text):
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and test(v)), text


# key -> (test, allowed range in words). A key absent from the config is not checked.
RULES = {
    "data.seq_len": _int_at_least(1),
    "data.batch_size": _int_at_least(1),
    "data.eval_batch_size": _int_at_least(1),
    "data.test_batch_size": _int_at_least(1),
    "data.valid_fraction": _number(lambda v: 0 < v < 1, "a number in (0, 1)"),
    "data.test_fraction": _number(lambda v: 0 < v < 1, "a number in (0, 1)"),
    "model.hidden_size": _int_at_least(1),
    "model.num_layers": _int_at_least(1),
    "model.dropout": _number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model.dropout_input": _number(lambda v: 0 <= v < 1, "a number in [0, 1) or null"),
    "model.dropout_hidden": _number(lambda v: 0 <= v < 1, "a number in [0, 1) or null"),
    "model.dropout_output": _number(lambda v: 0 <= v < 1, "a number in [0, 1) or null"),
    "model.dropout_embedding": _number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model.weight_drop": _number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model.embedding_size": _int_at_least(1),
    "model.rounds": _int_at_least(0),
    "model.rank": _int_at_least(0),
    "loss.ar_alpha": _number(lambda v: v >= 0, "a number >= 0"),
    "loss.tar_beta": _number(lambda v: v >= 0, "a number >= 0"),
    "model.init_range": _number(lambda v: v > 0, "a number > 0"),
    "optimizer.lr": _number(lambda v: v > 0, "a number > 0"),
    "trainer.max_epochs": _int_at_least(1),
    "trainer.max_time": ((lambda v: isinstance(v, str) and re.fullmatch(r"\d+:\d+:\d+:\d+", v) is not None),
                         'a duration "DD:HH:MM:SS" (e.g. 00:01:00:00) or null'),
    "trainer.gradient_clip_val": _number(lambda v: v >= 0, "a number >= 0 (0 or null: no clipping)"),
    "seed": _int_at_least(0),
    "cpu.threads": _int_at_least(1),
}
CHOICES = {"data.level": ("char", "word"), "data.unknown": ("unk", "error")}
# Keys that moved: an override of the old name is refused with the new one.
MOVED = {"model.sum_over_time": "loss.sum_over_time", "model.ar_alpha": "loss.ar_alpha",
         "model.tar_beta": "loss.tar_beta", "scheduler.lr_lambda.max_epoch": "scheduler.max_epoch",
         "scheduler.lr_lambda.decay": "scheduler.decay"}


def check_moved(args: list[str]) -> None:
    """Refuse a command-line override of a key that moved, naming where it went (Hydra would say only that
    the key is not in the config, in four lines)."""
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in MOVED:
            raise CharlmError(f"{key} is now {MOVED[key]}: pass {arg.replace(key, MOVED[key], 1).lstrip('+~')}")


def check(cfg: DictConfig) -> None:
    """Raise CharlmError for a required value left out, or the first value outside its allowed range."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise CharlmError(f"{missing[0]} is required: pass {missing[0]}=...")
    for key, (test, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not test(value):
            raise CharlmError(f"{key}={value!r} is out of range: it must be {allowed}")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in choices:
            raise CharlmError(f"{key}={value!r} is not allowed: it must be one of {', '.join(choices)}")


def check_writable(directory: str | Path, key: str) -> None:
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe = Path(directory) / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CharlmError(f"cannot write the output directory {directory} ({e.strerror}); "
                          f"set {key} to a writable place") from None


class Preflight(Callback):
    """Hydra callback: the output directory is checked before Hydra writes into it (Hydra's own failure
    there is a traceback), and reported like every other bad input: one line, exit code 2."""

    def _check(self, directory: str, key: str) -> None:
        with exit_on_error():
            check_writable(directory, key)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
