"""Small Lightning callbacks: training throughput, the per-epoch history that metrics.json keeps, the
per-epoch text sample and where-the-bits-go table in TensorBoard, and interrupts. (A run's time budget: charlm.budget.)"""

from __future__ import annotations

import signal
import threading
import time

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from charlm.api import Model
from charlm.metrics import position_markdown


class Throughput(L.Callback):
    """Logs predicted training symbols (chars or words) per second, averaged over each logging interval."""

    def __init__(self) -> None:
        self.tokens, self.start = 0, None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.tokens, self.start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += batch[1].numel() * trainer.world_size
        if (trainer.global_step % trainer.log_every_n_steps == 0) and self.start is not None:
            now = time.perf_counter()
            pl_module.log(f"train/{pl_module.kind.unit}_per_sec", self.tokens / max(now - self.start, 1e-9))
            self.tokens, self.start = 0, now


class History(L.Callback):
    """Keeps every epoch's logged metrics (train running and valid) as plain numbers for metrics.json."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.lr: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # the epoch's learning rate: by its end-of-epoch validation, epoch schedulers have already stepped
        self.lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items()
                    if k.startswith(("train/", "valid/")) and not k.startswith(("train/step", "train/loss"))})
        row["lr"] = self.lr
        self.epochs.append(row)

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict.get("epochs", []))


class SaveOnInterrupt(L.Callback):
    """Ctrl-C (SIGINT) or SIGTERM: write last.ckpt before exiting and say how to resume.

    During fit, Ctrl-C only raises a flag that the next batch turns into KeyboardInterrupt, as Lightning
    does with SIGTERM: raised at any other moment, it can land inside the TensorBoard writer's queue or a
    file write and leave the shutdown waiting forever. A second Ctrl-C interrupts at once.
    """

    def __init__(self, path: str, resume_hint: str = "python train.py ...") -> None:
        self.path, self.resume_hint = path, resume_hint
        self.requested, self.previous = False, None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self.requested, self.previous = False, signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def _stop_if_requested(self, *args) -> None:
        if self.requested:
            raise KeyboardInterrupt

    on_train_batch_end = on_validation_batch_end = _stop_if_requested

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
            print(f"\ninterrupted at step {trainer.global_step}; saved {self.path}\n"
                  f"resume with: {self.resume_hint} ckpt_path={self.path}", flush=True)


def tensorboards(trainer) -> list[TensorBoardLogger]:
    """The run's TensorBoard loggers, on the process that writes them (none while sanity checking)."""
    if trainer.sanity_checking or not trainer.is_global_zero:
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class BitsByPosition(L.Callback):
    """After each validation, logs where its bits went by kind of position (LanguageModel.valid_positions,
    summed as the validation runs) to TensorBoard's text tab: the table charlm.inspect draws for one text."""

    def on_validation_end(self, trainer, pl_module) -> None:
        rows = getattr(pl_module, "position_rows", None)
        for logger in tensorboards(trainer) if rows else []:
            logger.experiment.add_text("valid/bits_by_position", position_markdown(rows), trainer.global_step)


class SampleText(L.Callback):
    """After each validation epoch, logs a short sample of the model to TensorBoard's text tab.

    It goes through the API's sampler with a fixed seed and its own generator, so samples from epoch to
    epoch are comparable and training's random stream is not disturbed.
    """

    def __init__(self, prime: str = "", length: int = 200, temperature: float = 0.8, seed: int = 0) -> None:
        self.prime, self.length, self.temperature, self.seed = prime, length, temperature, seed

    def on_validation_end(self, trainer, pl_module) -> None:
        loggers = tensorboards(trainer)
        if not loggers:
            return
        model = Model(pl_module.net, pl_module.vocab, pl_module.kind)
        text = model.sample(self.prime, self.length, self.temperature, seed=self.seed)
        markdown = "\n".join("    " + line for line in text.split("\n"))  # a code block keeps the text as is
        for logger in loggers:
            logger.experiment.add_text("valid/sample", markdown, trainer.global_step)
