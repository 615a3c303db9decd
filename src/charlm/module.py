"""The LightningModule: truncated BPTT with carried hidden states, token-weighted metrics, Hydra optimisers."""

from __future__ import annotations

import copy
import math
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from charlm import metrics
from charlm.errors import CharlmError
from charlm.metrics import TokenNLL
from charlm.model import LSTMLM, State, detach
from charlm.optim import clip_grad_norm


def _plain(cfg: Any) -> Any:
    """Config objects become plain dicts, so checkpoints load without Hydra or pickled classes."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class ZarembaDecay:
    """Zaremba's main.lua schedule as a LambdaLR factor: after each epoch e (1-based) with e > max_epoch
    the learning rate is divided by `decay`, so the 0-based epoch E trains at lr / decay**max(0, E - max_epoch)."""

    def __init__(self, max_epoch: int = 4, decay: float = 2.0):
        self.max_epoch, self.decay = max_epoch, decay

    def __call__(self, epoch: int) -> float:
        return self.decay ** -max(0, epoch - self.max_epoch)


class OneCycle:
    """OneCycleLR's shape as a LambdaLR factor whose length can change while the run goes: a linear warm-up
    from 1/div_factor to 1 over the first pct_start of total_steps, then a linear or cosine anneal to
    1/(div_factor * final_div_factor) at the last step. torch's OneCycleLR fixes its length when it is made;
    here charlm.callbacks.FitTimeBudget shortens it when the epochs so far show fewer fit in
    trainer.max_time. LambdaLR saves the factor's attributes with its state, so a resumed run keeps them."""

    def __init__(self, total_steps: int | str = "auto", pct_start: float = 0.1, div_factor: float = 10,
                 final_div_factor: float = 100, anneal_strategy: str = "linear"):
        self.total_steps, self.pct_start, self.anneal = total_steps, pct_start, anneal_strategy
        self.start, self.end = 1 / div_factor, 1 / (div_factor * final_div_factor)

    def __call__(self, step: int) -> float:
        """The factor at `step`, phase by phase as torch's OneCycleLR (three_phase off) computes it."""
        warm_end = self.pct_start * self.total_steps - 1
        if step <= warm_end:
            t, a, b = step / warm_end, self.start, 1.0
        else:
            t, a, b = (step - warm_end) / (self.total_steps - 1 - warm_end), 1.0, self.end
        t = min(t, 1.0)
        if self.anneal == "linear":
            return a + (b - a) * t
        return b + (a - b) * (1 + math.cos(math.pi * t)) / 2


class LanguageModel(L.LightningModule):
    """The LSTM language model trained with truncated BPTT.

    The training state is carried from window to window (detached at each step) and reset at each epoch;
    validation and test carry their own state over the whole split, so neither disturbs the other.
    `level` is the data's kind of symbol: it picks the reported figures (charlm.metrics). With
    `sum_over_time` the gradient is that of the NLL summed over a window's steps and averaged over the
    batch, as in Zaremba's main.lua (seq_len times the per-symbol mean's, which is what is logged).
    `ar_alpha` and `tar_beta` add AWD-LSTM's activation regularisation (alpha times the mean square of the
    last layer's dropped output) and temporal activation regularisation (beta times the mean square of the
    change of its raw output from one step to the next) to the training loss; the logged loss is the NLL.
    `network` holds LSTMLM's other options (per-place, locked, embedding and weight dropout, tied weights).
    A window shorter or longer than `data.seq_len` (data.variable_length) trains at the learning rate
    scaled by its length / seq_len, as AWD-LSTM does.
    """

    def __init__(self, vocab: list[str], hidden_size: int = 200, num_layers: int = 2, dropout: float = 0.2,
                 init_range: float = 0.1, optimizer: dict | None = None, scheduler: dict | None = None,
                 level: str = "char", sum_over_time: bool = False, ar_alpha: float = 0.0, tar_beta: float = 0.0,
                 seq_len: int | None = None, **network):
        super().__init__()
        self.save_hyperparameters({"vocab": list(vocab), "hidden_size": hidden_size, "num_layers": num_layers,
                                   "dropout": dropout, "init_range": init_range,
                                   "optimizer": _plain(optimizer), "scheduler": _plain(scheduler),
                                   "level": level, "sum_over_time": sum_over_time, "ar_alpha": ar_alpha,
                                   "tar_beta": tar_beta, "seq_len": seq_len, **network},
                                  logger=False)
        self.vocab = list(vocab)
        self.level, self.headline = level, metrics.HEADLINE[level]
        self.net = LSTMLM(len(vocab), hidden_size, num_layers, dropout, init_range, **network)
        self.window_len: int | None = None  # the last training window's length
        # ModuleDict keys may not shadow Module attributes such as .train, hence the suffix; no NaN
        # check inside the metric (a host sync every step): divergence is caught in training_step.
        self.nll = torch.nn.ModuleDict({f"{s}_nll": TokenNLL() for s in ("train", "valid", "test")})
        self.train_state: State | None = None
        self.eval_state: State | None = None
        self.best_valid = math.inf  # of the headline figure
        self.results: dict[str, dict[str, float]] = {}  # the last full-precision metrics of each split

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        return self.net(x, state)

    def _nll(self, batch: tuple[torch.Tensor, torch.Tensor], state: State | None,
             penalty: bool = False) -> tuple[torch.Tensor, State] | tuple[torch.Tensor, State, torch.Tensor]:
        """Mean NLL of a window and the state after it; with `penalty`, also AR + TAR of its last layer."""
        x, y = batch
        alpha, beta = self.hparams.get("ar_alpha", 0.0), self.hparams.get("tar_beta", 0.0)
        logits, state, (raw, dropped) = self.net(x, state, outputs=True)
        # the logits are a (batch, time) view of time-major memory: read in place, time-major, as are the targets
        nll = F.cross_entropy(logits.transpose(0, 1).flatten(0, 1).float(), y.t().flatten())
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
        self.train_state = detach(state)
        self.window_len = batch[1].size(1)
        self.nll["train_nll"].update(loss.detach(), batch[1].numel())
        if self._logging_step():
            self.log("train/loss", loss, prog_bar=True)
            self.log_dict({f"train/step_{k}": v for k, v in metrics.per_step(loss.detach(), self.level).items()},
                          prog_bar=True)
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
        loss, self.eval_state = self._nll(batch, self.eval_state)
        self.nll[f"{split}_nll"].update(loss, batch[1].numel())

    def on_validation_epoch_start(self) -> None:
        self.eval_state = None

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("valid", batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.nll["valid_nll"].reset()
            return
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
        values = metrics.from_nll(float(self.nll[f"{split}_nll"].compute()), self.level)
        if reset:
            self.nll[f"{split}_nll"].reset()
        self.results[split] = values
        self.log_dict({f"{split}/{k}": v for k, v in values.items()}, prog_bar=split == "valid")
        return values

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = dict(self.hparams.optimizer)
        named = cfg.pop("named_parameters", False)  # an optimiser that treats layers apart (charlm.optim.MuonAdamW)
        opt = hydra.utils.instantiate(cfg, params=self.named_parameters() if named else self.parameters())
        if not self.hparams.scheduler:
            return opt
        cfg = copy.deepcopy(dict(self.hparams.scheduler))
        interval = cfg.pop("interval", "epoch")
        for node in (cfg, cfg.get("lr_lambda")):  # OneCycleLR or charlm's OneCycle over exactly this run's steps
            if isinstance(node, dict) and node.get("total_steps") == "auto":
                node["total_steps"] = int(self.trainer.estimated_stepping_batches)
        sched = hydra.utils.instantiate(cfg, optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Besides what Lightning saves (weights, optimiser, scheduler, loop and data position), keep what
        continuing exactly needs: the carried hidden state, the epoch's running NLL and the RNG states."""
        train_nll = self.nll["train_nll"]
        checkpoint["charlm"] = {
            "vocab": self.vocab,
            "level": self.level,
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
            if isinstance(self.train_state, tuple) and isinstance(self.train_state[0], torch.Tensor):
                self.train_state = tuple(tuple(t.split(1)) for t in self.train_state)  # (layers, batch, H) before
            self.nll["train_nll"].total, self.nll["train_nll"].count = saved["train_nll"]
        if "rng" in saved:
            torch.set_rng_state(saved["rng"]["torch"])
            if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
