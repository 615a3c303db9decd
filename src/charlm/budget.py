"""A time budget is a schedule's length: a run given `trainer.max_time` trains for that time and ends with
its learning-rate schedule finished, its last validation of its final weights, and its test, all inside it."""

from __future__ import annotations

import math
import time

import lightning as L

from charlm import schedules
from charlm.data import limited


def seconds(duration: str) -> float:
    """Lightning's max_time text, "DD:HH:MM:SS", in seconds."""
    days, hours, minutes, secs = (float(part) for part in duration.split(":"))
    return ((days * 24 + hours) * 60 + minutes) * 60 + secs


class TimeBudget(L.Callback):
    """With a budget (`max_time`, as trainer.max_time), decides the step the run ends at and lays the schedule
    over the steps up to it (charlm.schedules.set_length); without one, does nothing.

    As the run goes (every `refit_s` seconds, so even inside the first epoch) it re-estimates that step from
    the time the latest steps took: the budget, less the time spent so far, less what the validations still
    due, the final validation and the test will take, less `margin` of the budget. An evaluation batch is
    timed on the sanity check and on each validation, as a share of a training step's time, so that the
    estimate follows the machine when it slows down or speeds up. At that step it stops the run, mid-epoch or not;
    Lightning then validates, so the last figures are of the final weights, and the run tests as usual.

    Why not trainer.max_time alone: it stops a run wherever the clock runs out, its learning rate still high,
    with no final validation, and the test after it. The time spent so far is kept in checkpoints, so a resumed
    run goes on with the budget it has left. What varies between two runs on one machine is the number of
    steps, and with it the schedule's length; the seed fixes the data order, initialisation and masks.
    """

    def __init__(self, max_time: str | None = None, test: bool = True, margin: float = 0.01,
                 refit_s: float | None = None) -> None:
        self.budget = seconds(max_time) if max_time else None
        self.test, self.margin = test, margin
        self.refit_s = refit_s if refit_s is not None else max(1.0, (self.budget or 0) / 200)
        self.started = time.monotonic()  # when the run began (charlm.train sets it to when fit began)
        self.spent_before = 0.0  # by earlier processes of a resumed run
        self.stop_at: int | None = None
        self.eval_batch_s: float | None = None  # one validation batch, measured
        self.eval_share: float | None = None  # eval_batch_s / the time of a training step then
        self.step_s: float | None = None  # a training step, over the latest steps
        self.clock: dict = {}

    def spent(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    # --- measuring -------------------------------------------------------------------------------------
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.clock["batch"] = time.monotonic()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:  # its first batch pays the kernels' warm-up: the fastest one counts
            took = time.monotonic() - self.clock["batch"]
            self.eval_batch_s = min(took, self.eval_batch_s or took)

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.update(refit=time.monotonic(), steps=trainer.global_step, eval_s=0.0, refits=0)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.clock["eval"] = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "refit" in self.clock:
            took = time.monotonic() - self.clock["eval"]
            self.clock["eval_s"] += took
            self.eval_batch_s = took / max(sum(trainer.num_val_batches), 1)
            if self.step_s:
                self.eval_share = self.eval_batch_s / self.step_s

    # --- deciding --------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.budget is None:
            return
        now, steps, stop_at = time.monotonic(), trainer.global_step - self.clock["steps"], self.stop_at
        if steps >= 5 and now - self.clock["refit"] >= self.refit_s:
            self.step_s = (now - self.clock["refit"] - self.clock["eval_s"]) / steps
            self.clock.update(refit=now, steps=trainer.global_step, eval_s=0.0, refits=self.clock["refits"] + 1)
            if self.eval_share is None and self.eval_batch_s and self.clock["refits"] == 2:  # past the warm-up
                self.eval_share = self.eval_batch_s / self.step_s
            stop_at = self.fit(trainer, self.step_s)
        if trainer.world_size > 1:  # every process ends where the first decides, or the others wait forever
            stop_at = trainer.strategy.broadcast(stop_at, src=0)
        if stop_at != self.stop_at:
            self.stop_at = stop_at
            for config in trainer.lr_scheduler_configs:
                schedules.set_length(config.scheduler, stop_at)
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True

    def fit(self, trainer, step_s: float) -> int:
        """The step to end at: as many as fit in what the budget leaves after the evaluations still due."""
        per_epoch = trainer.num_training_batches
        limit = per_epoch * max(trainer.max_epochs or 1, 1)
        if trainer.max_steps not in (None, -1):
            limit = min(limit, trainer.max_steps)
        if "valid_batches" not in self.clock:
            self.clock.update(valid_batches=self._batches(trainer, "valid"), test_batches=self._batches(trainer, "test"))
        if self.eval_share is not None:
            eval_batch_s = self.eval_share * step_s
        else:  # before the share is known: as timed, or (num_sanity_val_steps=0) a guess
            eval_batch_s = self.eval_batch_s or step_s / 2
        validation = eval_batch_s * self.clock["valid_batches"]
        left = self.budget * (1 - self.margin) - self.spent() - validation
        left -= eval_batch_s * self.clock["test_batches"] if self.test else 0
        end = trainer.global_step
        for _ in range(3):  # the validations due before the end depend on where the end is
            due = self._validations_between(trainer, trainer.global_step, end) * validation
            end = trainer.global_step + max(0, math.floor((left - due) / step_s))
        return max(min(end, limit), min(trainer.global_step + 1, limit))  # one more step, at the final rate

    @staticmethod
    def _validations_between(trainer, start: int, end: int) -> int:
        """Validations that fall after step `start` and before step `end` (the one at `end` is the final one)."""
        every = trainer.val_check_batch
        if not every or every == float("inf"):
            return 0
        epochs = trainer.check_val_every_n_epoch or 1
        period = int(every) if every < trainer.num_training_batches else trainer.num_training_batches * epochs
        return max(0, (end - 1) // period - start // period)

    @staticmethod
    def _batches(trainer, split: str) -> int:
        """A validation's or the test's batches, as the trainer will limit them (the data module's loaders)."""
        if trainer.datamodule is None:
            return 0
        if split == "valid":
            batches, limit = len(trainer.datamodule.val_dataloader()), trainer.limit_val_batches
        else:
            batches, limit = len(trainer.datamodule.test_dataloader()), trainer.limit_test_batches
        return limited(batches, limit)

    # --- resuming --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"spent": self.spent(), "stop_at": self.stop_at, "eval_batch_s": self.eval_batch_s,
                "eval_share": self.eval_share}

    def load_state_dict(self, state_dict: dict) -> None:
        self.spent_before = state_dict.get("spent", 0.0)
        self.stop_at, self.eval_batch_s = state_dict.get("stop_at"), state_dict.get("eval_batch_s")
        self.eval_share = state_dict.get("eval_share")
