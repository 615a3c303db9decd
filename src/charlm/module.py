"""The LightningModule: truncated BPTT with carried states, token-weighted metrics, the optimiser's step.

It takes a built network (charlm.nets' contract) and optimiser and scheduler factories, so it knows no
config system: the run layer (charlm.train) builds them from Hydra's config."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from charlm import nets
from charlm.data import limited
from charlm.errors import CharlmError
from charlm.metrics import PositionBits, TokenNLL
from charlm.optim import clip_grad_norm
from charlm.symbols import Symbols, kind

# What a checkpoint's "charlm" entry holds: 2 adds the network's description ("net") and the kind of symbol
# ("symbols"); 1 (no "format" key) was the LSTM alone, its options among the hyper-parameters.
FORMAT = 2


class LanguageModel(L.LightningModule):
    """A language model trained with truncated BPTT.

    The training state is carried from window to window (detached at each step) and reset at each epoch;
    validation and test carry their own state over the whole split, so neither disturbs the other.
    `net` is any network of charlm.nets' contract, or its description ({"_target_": class path, **options});
    the description (`net_config` for a built network) is kept in checkpoints, so that charlm.load and
    load_from_checkpoint rebuild it. `symbols` is the data's kind of symbol:
    it picks the reported figures. `optimizer(named_parameters)` makes the optimiser and
    `scheduler(optimizer, total_steps)` Lightning's scheduler config (charlm.schedules).
    With `sum_over_time` the gradient is that of the NLL summed over a window's steps and averaged over the
    batch, as in Zaremba's main.lua (seq_len times the per-symbol mean's, which is what is logged).
    `ar_alpha` and `tar_beta` add AWD-LSTM's activation regularisation (alpha times the mean square of the
    last layer's dropped output) and temporal activation regularisation (beta times the mean square of the
    change of its raw output from one step to the next) to the training loss, for a network whose forward
    takes `outputs=True`; the logged loss is the NLL. A window shorter or longer than `seq_len`
    (data.variable_length) trains at the learning rate scaled by its length / seq_len, as AWD-LSTM does.
    """

    def __init__(self, net: nn.Module | dict, vocab: Sequence[str], symbols: Symbols | str = "char",
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., dict] | None = None, sum_over_time: bool = False, ar_alpha: float = 0.0,
                 tar_beta: float = 0.0, seq_len: int | None = None, net_config: dict | None = None):
        super().__init__()
        if isinstance(net, dict):
            net_config, net = dict(net), nets.build(net, len(vocab))
        self.kind = kind(symbols) if isinstance(symbols, str) else symbols
        if (ar_alpha or tar_beta) and not nets.takes_outputs(net):
            raise CharlmError(f"loss.ar_alpha and loss.tar_beta need a network whose forward takes outputs=True "
                              f"(docs/networks.md); {type(net).__name__}'s does not: set both to 0")
        self.net_config = net_config or {"_target_": nets.target_of(type(net))}
        self.save_hyperparameters({"net": self.net_config, "vocab": list(vocab),
                                   "symbols": self.kind.name, "sum_over_time": sum_over_time,
                                   "ar_alpha": ar_alpha, "tar_beta": tar_beta, "seq_len": seq_len}, logger=False)
        self.vocab, self.net, self.headline = list(vocab), net, self.kind.headline
        self.optimizer = optimizer or (lambda params: torch.optim.SGD(params, lr=1.0))
        self.scheduler = scheduler
        self.window_len: int | None = None  # the last training window's length
        # ModuleDict keys may not shadow Module attributes such as .train, hence the suffix; no NaN
        # check inside the metric (a host sync every step): divergence is caught in training_step.
        self.nll = torch.nn.ModuleDict({f"{s}_nll": TokenNLL() for s in ("train", "valid", "test")})
        self.valid_positions = PositionBits(self.kind, vocab)  # where a validation's bits go (charlm.inspect's table)
        self.position_rows: list[dict] = []  # the last validation's, for callbacks.BitsByPosition
        self.train_state: Any = None
        self.eval_state: Any = None
        self.best_valid = math.inf  # of the headline figure
        self.results: dict[str, dict[str, float]] = {}  # the last full-precision metrics of each split

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        return self.net(x, state)

    def _nll(self, batch: tuple[torch.Tensor, torch.Tensor], state: Any, penalty: bool = False,
             per_symbol: bool = False) -> tuple[torch.Tensor, Any] | tuple[torch.Tensor, Any, torch.Tensor]:
        """Mean NLL of a window and the state after it; with `penalty`, also AR + TAR of its last layer; with
        `per_symbol`, also each symbol's NLL, (batch, time)."""
        x, y = batch
        alpha, beta = self.hparams.ar_alpha, self.hparams.tar_beta
        if penalty and (alpha or beta):
            logits, state, (raw, dropped) = self.net(x, state, outputs=True)
        else:
            logits, state = self.net(x, state)
        # (batch, time) logits, read time-major (for a time-major network, in place), as are the targets
        flat = logits.transpose(0, 1).flatten(0, 1).float(), y.t().flatten()
        if per_symbol:
            each = F.cross_entropy(*flat, reduction="none")
            return each.mean(), state, each.view(y.size(1), y.size(0)).t()
        nll = F.cross_entropy(*flat)
        if not penalty:
            return nll, state
        extra = torch.zeros((), device=nll.device)
        if alpha:
            extra = extra + alpha * dropped.float().pow(2).mean()
        if beta and raw.size(0) > 1:
            extra = extra + beta * (raw[1:] - raw[:-1]).float().pow(2).mean()
        return nll, state, extra

    # --- training -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:  # a new epoch; a run resumed mid-epoch continues at batch_idx > 0 with its state
            self.train_state = None
            self.nll["train_nll"].reset()
        loss, state, extra = self._nll(batch, self.train_state, penalty=True)
        if not math.isfinite(value := loss.item()):  # a host sync, as torch.isfinite's would be: none on CPU
            raise CharlmError(f"training diverged: the loss is {value} at step {self.global_step} "
                              f"(epoch {self.current_epoch + 1}); lower optimizer.lr or the clipping threshold "
                              f"and start again (best.ckpt holds the best weights so far)")
        self.train_state = nets.detach(state)
        self.window_len = batch[1].size(1)
        self.nll["train_nll"].update(loss.detach(), batch[1].numel())
        if self._logging_step():
            self.log("train/loss", loss, prog_bar=True)
            self.log(f"train/step_{self.headline}", self.kind.step_figure(loss.detach()), prog_bar=True)
        if self.hparams.sum_over_time:
            return loss * batch[1].size(1) + extra
        return loss + extra

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, except that a window of another length than data.seq_len (data.variable_length)
        steps at the learning rate scaled by length / seq_len, as AWD-LSTM's main.py does. The scaling sits
        between the closure (forward, backward) and the update, and is undone before anything else runs, so
        no checkpoint or scheduler ever sees it."""
        seq_len, saved = self.hparams.get("seq_len"), []

        def closure():
            loss = optimizer_closure()
            if seq_len and self.window_len and self.window_len != seq_len:
                for group in optimizer.param_groups:
                    saved.append(group["lr"])
                    group["lr"] *= self.window_len / seq_len
            return loss

        try:
            optimizer.step(closure=closure)
        finally:
            for group, lr in zip(optimizer.param_groups, saved):
                group["lr"] = lr

    def _logging_step(self) -> bool:
        """Whether the trainer writes this step's metrics to its loggers (every `log_every_n_steps`).

        Why training_step asks: a `self.log` call on the other steps changes nothing the loggers see, yet
        costs Lightning about a millisecond of Python, a tenth of a step at the course's size
        (`python bench/throughput.py --tricks` measures it). Outside a Trainer there is nothing to log to.
        """
        try:
            every = self.trainer.log_every_n_steps
        except RuntimeError:  # not attached to a Trainer (the module stepped by hand)
            return False
        return every > 0 and (self.global_step + 1) % every == 0

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as the trainer asks (`trainer.gradient_clip_algorithm`: norm, the default, or value); by norm,
        log the norm the clipping measured anyway."""
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return
        norm = clip_grad_norm(params, gradient_clip_val)
        if self._logging_step():
            self.log("train/grad_norm", norm)

    # --- evaluation -----------------------------------------------------------------------------
    def _eval_step(self, split: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        if split == "valid":
            loss, self.eval_state, each = self._nll(batch, self.eval_state, per_symbol=True)
            self.valid_positions.update(*batch, each)
        else:
            loss, self.eval_state = self._nll(batch, self.eval_state)
        self.nll[f"{split}_nll"].update(loss, batch[1].numel())

    def on_validation_epoch_start(self) -> None:
        self.eval_state = None

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("valid", batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.nll["valid_nll"].reset()
            self.valid_positions.reset()
            return
        self.position_rows = self.valid_positions.compute()
        self.valid_positions.reset()
        if self.nll["train_nll"].update_called:  # the running train metrics of the epoch so far
            self._log_split("train", reset=False)
        value = self._log_split("valid")[self.headline]
        self.best_valid = min(self.best_valid, value)
        self.log(f"valid/best_{self.headline}", self.best_valid)

    def on_test_epoch_start(self) -> None:
        self.eval_state = None

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def _log_split(self, split: str, reset: bool = True) -> dict[str, float]:
        """Token-weighted NLL over the whole split (not a mean of batch means), and what derives from it."""
        values = self.kind.figures(float(self.nll[f"{split}_nll"].compute()))
        if reset:
            self.nll[f"{split}_nll"].reset()
        self.results[split] = values
        self.log_dict({f"{split}/{k}": v for k, v in values.items()}, prog_bar=split == "valid")
        return values

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer(self.named_parameters())  # names: an optimiser may treat layers apart (MuonAdamW)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt, total_steps=self.total_steps())}

    def total_steps(self) -> int:
        """The optimiser steps the run takes (max_epochs x the training batches an epoch, as limited).

        Why not trainer.estimated_stepping_batches: asked in configure_optimizers, it sets the training
        loader up before a checkpoint's loader position is restored, so a run resumed mid-epoch would start
        its epoch over. The data module's own loader says how many windows an epoch has."""
        trainer = self.trainer
        if trainer.datamodule is None:
            return int(trainer.estimated_stepping_batches)
        batches = limited(len(trainer.datamodule.train_dataloader()), trainer.limit_train_batches)
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs or 1, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps not in (None, -1) else steps

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Besides what Lightning saves (weights, optimiser, scheduler, loop and data position), keep what
        continuing exactly needs: the carried hidden state, the epoch's running NLL and the RNG states."""
        train_nll = self.nll["train_nll"]
        checkpoint["charlm"] = {
            "format": FORMAT,
            "net": self.net_config,
            "vocab": self.vocab,
            "symbols": self.kind.name,
            f"best_valid_{self.headline}": self.best_valid,
            "train_state": self.train_state,
            "train_nll": (train_nll.total.clone(), train_nll.count.clone()),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("charlm", {})
        self.best_valid = saved.get(f"best_valid_{self.headline}", math.inf)
        if "train_state" in saved:
            self.train_state = saved["train_state"]
            legacy = "format" not in saved and isinstance(self.train_state, tuple)
            if legacy and isinstance(self.train_state[0], torch.Tensor):  # the LSTM's (layers, batch, H) once
                self.train_state = tuple(tuple(t.split(1)) for t in self.train_state)
            self.nll["train_nll"].total, self.nll["train_nll"].count = saved["train_nll"]
        if "rng" in saved:
            torch.set_rng_state(saved["rng"]["torch"])
            if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
