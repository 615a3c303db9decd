"""Training throughput: the project's own step against a plain PyTorch loop of the same model and data.

    python bench/throughput.py            # every CPU configuration (~6 min); writes docs/performance.md and a JSON file
    python bench/throughput.py --quick    # the course configuration and 2x512, in a few minutes

"project" is `python train.py` as it runs: the config composed from conf/ with Hydra, the data, model and
Trainer built by charlm.train.build (TensorBoard logging, progress bar, clipping and callbacks on), timed
between the batch-end hooks of its steps. "plain" is the training loop of pytorch/examples'
word_language_model (batchify, get_batch slices, repackage_hidden, clip_grad_norm_, a manual SGD step,
loss.item() every step) on the same network, initialisation and data order. "best" is the project
with its best settings (BEST, or --best). With --module-loop, "module loop" is the project's own data,
LightningModule, optimiser and clipping stepped by a loop like the plain one: the project without the
Trainer. With --barebones, "barebones" is the same module in Lightning's `Trainer(barebones=True)`, which
switches off everything that costs (logging, checkpoints, progress bar, profiler): the Trainer's own
floor. Every run is a fresh Python process, as a user's would be, timed after its warm-up steps; the
variants alternate, several rounds, and each ratio is the median over rounds of variant / plain measured
in the same round. Characters per second count predicted symbols. The last line is
`course_ratio=R1 best_ratio=R2`: the project against
the plain loop at the course's configuration, and the best settings against the plain loop at 2x512
(BEST_AT; bf16 pays off on matrices larger than the course's; every configuration's is on the line before).

With --tricks, the table at the end gives what each of the project's speed tricks (TRICKS) buys, as project /
project without it, in characters per second, the median over rounds; nothing of the project is patched:
- keep_freed_memory is a config value: "without keep_freed_memory" is the project with
  `cpu.keep_freed_memory=false`, and the gain is project / that variant, measured in the same round.
- The others are not options, so one more run of the project per round, "trick costs" (TrickCosts), times on
  each of its steps the project's code against what it stands in for, on what that step hands it:
  `charlm.nets.dropout.dropout_masks` against F.dropout's masks (bernoulli_ per element, then scaled) of the
  step's shapes and rates; `charlm.optim.clip_grad_norm` against `torch.nn.utils.clip_grad_norm_` on the
  step's gradients (put back after each); and, on a step that is not a logging step, the `self.log`
  calls a logging step makes (STEP_LOGS), which without the trick every step would make (only the calls:
  trainer.log_every_n_steps=1 would also write every step to the loggers). With d a trick's
  extra seconds per character (without - project, over the timed steps), the step without it takes
  1/cps + d per character, so its gain is 1 + d * cps, cps the project's characters per second that round.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from charlm.nets.dropout import dropout_masks
from charlm.optim import clip_grad_norm
from charlm.train import build

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "performance.md"
DEFAULT_THREADS = torch.get_num_threads()
BEST = ["trainer.precision=bf16-mixed"]  # the project's fastest settings (docs/performance.md)
# name -> (overrides of the course config, timed steps, warm-up steps)
CONFIGS = {
    "course": ([], 300, 20),
    "b64_s100": (["data.batch_size=64", "data.seq_len=100"], 16, 3),
    "2x512": (["model.hidden_size=512"], 100, 10),
    "b128_3x1000": (["data.batch_size=128", "data.seq_len=150", "model.hidden_size=1000", "model.num_layers=3"], 30, 5),
}
CPU_CONFIGS, GPU_CONFIGS, QUICK_CONFIGS = ["course", "b64_s100", "2x512"], ["course", "b128_3x1000"], ["course", "2x512"]
BEST_AT = "2x512"  # best_ratio: where the best settings are meant for (models larger than the course's)
# Every project run: one epoch of exactly the steps measured, no validation or test, no model summary.
BENCH = ["trainer.max_epochs=1", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
         "trainer.enable_model_summary=false", "test=false"]
# --barebones: no callbacks of the project's, no logger, no progress bar, no self.log, no checkpoints
BAREBONES = ["~callbacks", "~logger", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=0",
             "+trainer.enable_checkpointing=false", "+trainer.barebones=true"]
# the variants a flag adds to plain, project and best: --module-loop and --barebones, with what each one is
EXTRA_VARIANTS = {"module loop": "the project's model code without the Trainer",
                  "barebones": "the project's module in Trainer(barebones=True)"}


clock = time.perf_counter  # --cpu-time: time.process_time, steadier than wall time on a busy machine


def compose_config(overrides: list[str], run_dir: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"run_dir={run_dir}", *overrides])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- the project -----------------------------------------------------------------------------------
class StepClock(L.Callback):
    """Times the training steps after `warmup`, from the batch-end hook before the first to the last's."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.chars, self.start, self.end = warmup, device, 0, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            sync(self.device)
            self.start = clock()
        elif batch_idx >= self.warmup:
            sync(self.device)
            self.chars, self.end = self.chars + batch[1].numel(), clock()


def fit_project(overrides: list[str], steps: int, warmup: int, device: str, run_dir: str,
                callbacks: tuple[L.Callback, ...] = ()) -> tuple[StepClock, L.Trainer]:
    """`python train.py overrides` for `warmup` + `steps` steps, the steps after `warmup` timed; `callbacks` added."""
    accelerator = "gpu" if device == "cuda" else "cpu"
    cfg = compose_config([*overrides, *BENCH, f"trainer.accelerator={accelerator}",
                          f"trainer.limit_train_batches={warmup + steps}"], run_dir)
    timer = StepClock(warmup, device)
    datamodule, model, trainer = build(cfg, extra_callbacks=[timer, *callbacks])
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        trainer.fit(model, datamodule=datamodule)
    return timer, trainer


def run_project(overrides: list[str], steps: int, warmup: int, device: str) -> float:
    """Characters per second of `python train.py overrides` over `steps` steps after `warmup`."""
    with tempfile.TemporaryDirectory() as run_dir:
        timer, _ = fit_project(overrides, steps, warmup, device, run_dir)
    return timer.chars / (timer.end - timer.start)


def checkpoint_cost(name: str, overrides: list[str], steps: int, warmup: int, device: str, saves: int = 10) -> dict:
    """A training step's time against a step checkpoint's (`trainer.save_checkpoint`, the median of `saves`):
    what a sweep job's `sweep.every_n_train_steps` costs (--checkpoint-cost)."""
    with tempfile.TemporaryDirectory() as run_dir:
        timer, trainer = fit_project(overrides, steps, warmup, device, run_dir)
        times = []
        for _ in range(saves):
            start = time.perf_counter()
            trainer.save_checkpoint(Path(run_dir) / "step.ckpt")
            times.append(time.perf_counter() - start)
    step_s, save_s = (timer.end - timer.start) / steps, statistics.median(times)
    every = compose_config([], "unused").sweep.every_n_train_steps
    return {"name": name, "step_ms": 1e3 * step_s, "save_ms": 1e3 * save_s, "every": every,
            "percent": 100 * save_s / (every * step_s), "save_ms_range": [1e3 * min(times), 1e3 * max(times)]}


# --- what each speed trick buys (--tricks) -----------------------------------------------------------
TRICKS = ("16-bit dropout masks", "CPU clipping", "keep_freed_memory", "self.log on logging steps only")
SWITCHED_OFF = {"keep_freed_memory": ["cpu.keep_freed_memory=false"]}  # the tricks that are config values
COSTS = "trick costs"  # the run that times the other tricks in the project's steps
# The self.log calls of a logging step, (name, on the progress bar): training_step's loss and step figure,
# configure_gradient_clipping's norm (when clipping by norm); under names of their own, apart from the project's.
STEP_LOGS = (("tricks/loss", True), ("tricks/step_figure", True), ("tricks/grad_norm", False))
# LSTMLM's dropout options besides model.dropout, as the benchmark's configurations leave them
OTHER_DROPOUT = {"dropout_input": None, "dropout_hidden": None, "dropout_output": None, "locked_dropout": False,
                 "dropout_embedding": 0.0, "weight_drop": 0.0, "embedding_size": None, "tie_weights": False}


def step_masks(model_cfg, batch: int, steps: int) -> tuple[list[tuple[int, int, int]], list[float]]:
    """The shapes and drop rates of the dropout masks a training step of `model_cfg`'s LSTMLM draws on a window of
    `batch` streams x `steps` symbols: (steps, batch, hidden_size) at model.dropout at the first layer's input,
    between the layers and at the output (LSTMLM's docstring)."""
    if model_cfg._target_ != "charlm.nets.LSTMLM" or any(model_cfg.get(k, v) != v for k, v in OTHER_DROPOUT.items()):
        raise ValueError("--tricks times the dropout of the course's LSTM: model.dropout, no other dropout option")
    n = model_cfg.num_layers + 1 if model_cfg.dropout > 0 else 0
    return [(steps, batch, model_cfg.hidden_size)] * n, [model_cfg.dropout] * n


def torch_dropout_masks(like: torch.Tensor, shapes, ps) -> list[torch.Tensor]:
    """F.dropout's masks, which dropout_masks stands in for: bernoulli_, one draw per element, then scaled."""
    return [torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p).div_(1 - p)
            for shape, p in zip(shapes, ps)]


class TrickCosts(L.Callback):
    """On each step of a project run, times the project's code against what it would run without each trick
    that is not a config value, on what the step hands it; `extra` sums (without - project) in seconds over the
    steps after `warmup`, whose characters `chars` counts. The two sides alternate which goes first."""

    def __init__(self, model_cfg, warmup: int, device: str):
        self.model_cfg, self.warmup, self.device = model_cfg, warmup, device
        self.extra = {trick: 0.0 for trick in TRICKS if trick not in SWITCHED_OFF}
        self.chars, self.batch_idx = 0, 0

    def timed(self, fn, *args) -> float:
        sync(self.device)
        start = clock()
        fn(*args)
        sync(self.device)
        return clock() - start

    def add(self, trick: str, project_s: float, without_s: float) -> None:
        if self.batch_idx >= self.warmup:
            self.extra[trick] += without_s - project_s

    def both(self, trick: str, project, without) -> None:
        """Time project() and without(), in alternating order, and add the difference."""
        if self.batch_idx % 2:
            without_s, project_s = self.timed(without), self.timed(project)
        else:
            project_s, without_s = self.timed(project), self.timed(without)
        self.add(trick, project_s, without_s)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_idx = batch_idx

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """CPU clipping: the step's gradients, as the Trainer is about to clip them, clipped by each function;
        put back after each, so the step goes on with them unclipped."""
        max_norm = trainer.gradient_clip_val
        if not max_norm or trainer.gradient_clip_algorithm == "value":
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        saved = [p.grad.clone() for p in params]

        def put_back() -> None:
            for p, grad in zip(params, saved):
                p.grad.copy_(grad)

        self.both("CPU clipping", lambda: (clip_grad_norm(params, max_norm), put_back()),
                  lambda: (torch.nn.utils.clip_grad_norm_(params, max_norm), put_back()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        like, (streams, steps) = next(pl_module.parameters()), batch[0].shape
        shapes, ps = step_masks(self.model_cfg, streams, steps)
        self.both("16-bit dropout masks", lambda: dropout_masks(like, shapes, ps),
                  lambda: torch_dropout_masks(like, shapes, ps))
        every = trainer.log_every_n_steps  # global_step has counted this step already
        if not (every > 0 and trainer.global_step % every == 0):  # the project logs nothing on this step
            by_norm = trainer.gradient_clip_val and trainer.gradient_clip_algorithm != "value"
            logs = [(name, bar) for name, bar in STEP_LOGS if by_norm or not name.endswith("grad_norm")]
            loss = outputs["loss"]
            self.add("self.log on logging steps only", 0.0,
                     self.timed(lambda: [pl_module.log(name, loss, prog_bar=bar) for name, bar in logs]))
        if batch_idx >= self.warmup:
            self.chars += batch[1].numel()


def trick_costs(overrides: list[str], steps: int, warmup: int, device: str) -> dict[str, float]:
    """The seconds per character that each trick TrickCosts times saves the project, over `steps` steps after
    `warmup` of `python train.py overrides`."""
    with tempfile.TemporaryDirectory() as run_dir:
        costs = TrickCosts(compose_config([*overrides, *BENCH], run_dir).model, warmup, device)
        fit_project(overrides, steps, warmup, device, run_dir, (costs,))
    return {trick: extra / costs.chars for trick, extra in costs.extra.items()}


def trick_gains(cps: dict[str, list[float]], costs: list[dict[str, float]]) -> dict[str, float]:
    """Each trick's project / without, the median over rounds: a config value's against its variant of the
    same round, a timed one's 1 + its seconds per character x the project's characters per second that round."""
    gains = {}
    for trick in TRICKS:
        if trick in SWITCHED_OFF:
            per_round = [a / b for a, b in zip(cps["project"], cps[f"without {trick}"])]
        else:
            per_round = [1 + c[trick] * p for c, p in zip(costs, cps["project"])]
        gains[trick] = statistics.median(per_round)
    return gains


# --- the project without the Trainer (--module-loop) --------------------------------------------------
def module_loop(overrides: list[str], steps: int, warmup: int = 0, device: str = "cpu") -> tuple[float, list[float]]:
    """Characters per second over `steps` steps after `warmup`, and every step's loss, of the project's own
    data, LightningModule, optimiser and clipping stepped by a hand-written loop, as the plain loop steps its
    model. Between the plain loop and the project, it tells the model code's share of the gap from the
    Trainer's. fp32 only: no precision plugin runs here."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config([*overrides, *BENCH], run_dir)
        datamodule, model, _ = build(cfg)
    model.to(device).train()
    params = list(model.parameters())
    optimizer = model.optimizer(model.named_parameters())
    losses, chars = [], 0
    for i, (x, y) in enumerate(datamodule.train_dataloader()):
        if i == warmup + steps:
            break
        if i == warmup:
            sync(device)
            start = clock()
        loss = model.training_step((x.to(device), y.to(device)), i)
        loss.backward()
        clip_grad_norm(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        chars += y.numel() if i >= warmup else 0
    sync(device)
    return chars / (clock() - start), losses


# --- the plain loop, written as pytorch/examples/word_language_model writes it -----------------------
class RNNModel(nn.Module):
    """Encoder, dropout, LSTM, dropout, decoder, log-softmax; (time, batch) layout."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float, init_range: float):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        for p in self.parameters():  # the course's initialisation, as the project's network has it
            nn.init.uniform_(p, -init_range, init_range)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return nn.functional.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        return (weight.new_zeros(self.rnn.num_layers, bsz, self.rnn.hidden_size),
                weight.new_zeros(self.rnn.num_layers, bsz, self.rnn.hidden_size))


def batchify(data: torch.Tensor, bsz: int, device: str) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous().to(device)


def get_batch(source: torch.Tensor, i: int, bptt: int):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


def repackage_hidden(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


def plain_loop(cfg, train_ids: torch.Tensor, ntoken: int, steps: int, warmup: int = 0,
               device: str = "cpu") -> tuple[float, list[float]]:
    """Characters per second over `steps` steps after `warmup`, and every step's loss."""
    if cfg.optimizer._target_ != "torch.optim.SGD" or cfg.loss.sum_over_time:
        raise ValueError("the plain loop trains with plain SGD on the mean NLL, as the course does")
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = RNNModel(ntoken, m.hidden_size, m.hidden_size, m.num_layers, m.dropout, m.init_range).to(device)
    criterion = nn.NLLLoss()
    train_data = batchify(train_ids, cfg.data.batch_size, device)
    lr, clip, bptt = cfg.optimizer.lr, cfg.trainer.gradient_clip_val, cfg.data.seq_len
    model.train()
    total_loss, losses, chars = 0.0, [], 0
    hidden = model.init_hidden(cfg.data.batch_size)
    for batch, i in enumerate(range(0, (warmup + steps) * bptt, bptt)):
        if batch == warmup:
            sync(device)
            start = clock()
        data, targets = get_batch(train_data, i, bptt)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        total_loss += loss.item()
        losses.append(loss.item())
        chars += targets.numel() if batch >= warmup else 0
    sync(device)
    return chars / (clock() - start), losses


# --- the physical limit ----------------------------------------------------------------------------
def peak_gflops(dtype: torch.dtype, device: str, seconds: float = 1.0) -> float:
    """Measured peak of a large square matrix product, GFLOP/s. On a GPU "fp32" is what cuDNN's fp32 LSTM
    runs on: TF32 tensor cores, unless torch.backends.cudnn.allow_tf32 is off."""
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device == "cuda" and torch.backends.cudnn.allow_tf32
    try:
        torch.mm(a, b)
        sync(device)
        reps, start = 0, clock()
        while clock() - start < seconds:
            torch.mm(a, b)
            reps += 1
            sync(device)
        return 2 * n**3 * reps / (clock() - start) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def flops_per_char(cfg, ntoken: int) -> float:
    """Matrix-product FLOPs to train on one character: 3x the forward (backward = 2x), elementwise ops left out."""
    h, layers = cfg.model.hidden_size, cfg.model.num_layers
    forward = layers * 2 * 4 * h * (h + h) + 2 * h * ntoken  # each layer's input is h wide (embedding = hidden)
    return 3.0 * forward


# --- the benchmark ---------------------------------------------------------------------------------
def train_split(cfg) -> tuple[int, torch.Tensor]:
    """The vocabulary size and the training split's ids, loaded by the project's data module."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return len(datamodule.vocab), datamodule.ids["train"]


def run_plain(overrides: list[str], steps: int, warmup: int, device: str = "cpu") -> float:
    """Characters per second of the plain loop on the data and configuration `overrides` compose."""
    cfg = compose_config(overrides, "unused")
    ntoken, train_ids = train_split(cfg)
    return plain_loop(cfg, train_ids, ntoken, steps, warmup, device)[0]


def measure(variant: str, overrides: list[str], steps: int, warmup: int, device: str) -> float | dict[str, float]:
    """Characters per second of one timed run of `variant` (plain, project, an EXTRA_VARIANTS one, "without T") in
    this process; for COSTS, trick_costs' seconds per character."""
    if variant == "plain":
        return run_plain(overrides, steps, warmup, device)
    if variant == "module loop":
        return module_loop(overrides, steps, warmup, device)[0]
    if variant == "barebones":
        return run_project([*overrides, *BAREBONES], steps, warmup, device)
    if variant == COSTS:
        return trick_costs(overrides, steps, warmup, device)
    if variant.startswith("without "):
        return run_project([*overrides, *SWITCHED_OFF[variant[len("without "):]]], steps, warmup, device)
    return run_project(overrides, steps, warmup, device)


def in_fresh_process(script: str, spec) -> dict:
    """`python SCRIPT --one SPEC` (SPEC as JSON) in a fresh Python process: the JSON its last line prints."""
    proc = subprocess.run([sys.executable, script, "--one", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{Path(script).name} --one {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def isolated(variant: str, overrides: list[str], steps: int, warmup: int, device: str) -> float | dict[str, float]:
    """`measure` in a fresh Python process, as `python train.py` or a hand-written script runs: state that
    one run leaves in a process (the allocator's heap above all) must not carry over into the next. Run
    side by side in one process, the variants moved each other by up to a third at 2x512."""
    spec = {"variant": variant, "overrides": overrides, "steps": steps, "warmup": warmup, "device": device,
            "clock": clock.__name__}
    return in_fresh_process(__file__, spec)["result"]


def alternate(runs: dict, rounds: int, label: str) -> dict[str, list]:
    """Each variant's result in each round (characters per second; COSTS: seconds per character of each trick);
    the order rotates, so no variant always runs first."""
    cps: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        names = list(runs)
        for k in names[r % len(names):] + names[:r % len(names)]:
            torch.set_num_threads(DEFAULT_THREADS)  # the project's cpu.threads must not leak into the plain loop
            cps[k].append(runs[k]())
        print(f"  {label} round {r + 1}/{rounds}: " + "  ".join(f"{k} {shown(cps[k][-1])}" for k in runs), flush=True)
    return cps


def shown(result: float | dict[str, float]) -> str:
    """A run's result in a round's line: characters per second, or each timed trick's nanoseconds per character."""
    if isinstance(result, float):
        return f"{result:,.0f}"
    return "(ns/char) " + ", ".join(f"{trick} {1e9 * v:+,.0f}" for trick, v in result.items())


def round_ratios(cps: dict[str, list[float]], variant: str) -> list[float]:
    """variant / plain in each round, the two measured in the same round."""
    return [a / b for a, b in zip(cps[variant], cps["plain"])]


def ratio_to_plain(cps: dict[str, list[float]], variant: str) -> float:
    """The median over rounds of variant / plain measured in the same round."""
    return statistics.median(round_ratios(cps, variant))


def bench_config(name: str, overrides: list[str], steps: int, warmup: int, rounds: int, best: list[str],
                 device: str, extra: tuple[str, ...] = ()) -> dict:
    """One configuration: the runs of plain, project, best and the `extra` variants, and their ratios."""
    cfg = compose_config(overrides, "unused")
    ntoken, _ = train_split(cfg)  # the vocabulary's size, for the FLOP count; every run loads its own data
    runs = {
        "plain": lambda: isolated("plain", overrides, steps, warmup, device),
        "project": lambda: isolated("project", overrides, steps, warmup, device),
        "best": lambda: isolated("project", [*overrides, *best], steps, warmup, device),
    }
    for variant in extra:
        runs[variant] = lambda variant=variant: isolated(variant, overrides, steps, warmup, device)
    cps = alternate(runs, rounds, name)
    costs = cps.pop(COSTS, None)
    ratio = {k: ratio_to_plain(cps, k) for k in cps if k != "plain"}
    return {"name": name, "overrides": overrides, "steps": steps, "warmup": warmup, "rounds": rounds,
            "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
            "model": f"{cfg.model.num_layers}x{cfg.model.hidden_size}", "flops_per_char": flops_per_char(cfg, ntoken),
            "chars_per_sec": {k: statistics.median(v) for k, v in cps.items()}, "all_chars_per_sec": cps,
            "round_ratios": {k: round_ratios(cps, k) for k in cps if k != "plain"},
            "ratio": ratio["project"], "best_ratio": ratio["best"],
            "trick_gains": trick_gains(cps, costs) if costs else {}, "trick_costs": costs,
            **{ratio_key(variant): ratio.get(variant) for variant in EXTRA_VARIANTS}}  # None: not run


def ratio_key(variant: str) -> str:
    """The key of an extra variant's ratio in a configuration's result: "module loop" -> "module_loop_ratio"."""
    return variant.replace(" ", "_") + "_ratio"


def table(result: dict) -> str:
    peak = result["peak_gflops"]
    rows = ["| config | model | batch × seq | plain chars/s | project chars/s | project / plain | "
            "best chars/s | best / plain | MFLOP/char | plain, project % of fp32 peak | best % of bf16 peak |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["configs"]:
        cps, f = c["chars_per_sec"], c["flops_per_char"]
        pct = {k: 100 * cps[k] * f / 1e9 / peak["bf16" if k == "best" else "fp32"] for k in cps}
        rows.append(f"| {c['name']} | {c['model']} | {c['batch_size']} × {c['seq_len']} | {cps['plain']:,.0f} | "
                    f"{cps['project']:,.0f} | {c['ratio']:.2f} | {cps['best']:,.0f} | {c['best_ratio']:.2f} | "
                    f"{f / 1e6:.2f} | {pct['plain']:.1f}, {pct['project']:.1f} % | {pct['best']:.1f} % |")
    return "\n".join(rows)


def tricks_table(configs: list[dict]) -> str:
    """What each speed trick buys: the project's speed over the project's with that trick off, per configuration."""
    rows = ["| trick | " + " | ".join(c["name"] for c in configs) + " |", "|---|" + "---:|" * len(configs)]
    for trick in TRICKS:
        rows.append(f"| {trick} | " + " | ".join(f"{c['trick_gains'][trick]:.3f}×" for c in configs) + " |")
    return "\n".join(rows)


def write_docs(path: Path, result: dict) -> None:
    """Replace the block between this device's markers in `path` (appended when absent)."""
    begin, end = f"<!-- throughput-{result['device']}:begin -->", f"<!-- throughput-{result['device']}:end -->"
    peak = result["peak_gflops"]
    block = "\n".join([
        begin,
        f"Measured {result['date']} on {result['machine']} ({result['threads']} CPU thread(s), torch "
        f"{result['torch']}, {result['clock']}) with `{result['command']}`. Peak of a large matrix product: "
        f"fp32 {peak['fp32']:,.0f} GFLOP/s, bf16 {peak['bf16']:,.0f} GFLOP/s. best = the project with "
        f"`{' '.join(result['best'])}`. FLOPs count the matrix products of a training step (3 × forward).",
        "",
        table(result),
        end])
    text = path.read_text() if path.exists() else "# Performance\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def docs_target(args: argparse.Namespace) -> Path | None:
    """Where the table goes: --docs, else docs/performance.md, but only from a full run: a quick run, a subset
    of the configurations, other step counts or CPU time would replace the documented table with another."""
    if args.docs:
        return args.docs
    return None if args.quick or args.configs or args.steps or args.cpu_time else DOCS


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], int, int]]:
    """(name, overrides, timed steps, warm-up steps) of each configuration to run. --quick halves the steps of
    2x512, not the course's: they are cheap, and its ratio is the goal's figure."""
    names = args.configs or (QUICK_CONFIGS if args.quick else GPU_CONFIGS if args.device == "cuda" else CPU_CONFIGS)
    runs = []
    for name in names:
        overrides, steps, warmup = CONFIGS[name]
        steps = args.steps or (max(steps // 2, 5) if args.quick and name != "course" else steps)
        runs.append((name, overrides, steps, max(1, min(warmup, steps))))
    return runs


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="course and 2x512 only, 3 rounds, half the steps at 2x512 (the course's all: cheap)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                        help=f"default: {' '.join(CPU_CONFIGS)} (cuda: {' '.join(GPU_CONFIGS)}; "
                             f"quick: {' '.join(QUICK_CONFIGS)})")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, help="alternations of the variants (default 5, quick 3)")
    parser.add_argument("--steps", type=int, help="timed steps of every configuration (default: per configuration)")
    parser.add_argument("--best", nargs="*", default=BEST, help=f"overrides of the best variant (default: {' '.join(BEST)})")
    parser.add_argument("--cpu-time", action="store_true",
                        help="count this process's CPU time, not wall time (steadier on a busy machine)")
    parser.add_argument("--module-loop", action="store_true",
                        help="also time the project's module stepped by a hand-written loop, without the Trainer")
    parser.add_argument("--barebones", action="store_true",
                        help="also time the project's module in Lightning's Trainer(barebones=True): the Trainer's floor")
    parser.add_argument("--tricks", action="store_true",
                        help="also measure what each of the project's speed tricks buys (see the docstring)")
    parser.add_argument("--checkpoint-cost", action="store_true",
                        help="only time a step checkpoint against a step: what sweep.every_n_train_steps costs")
    parser.add_argument("--json", type=Path, help="default outputs/bench/throughput-<device>[-quick].json")
    parser.add_argument("--docs", type=Path, help=f"write the table into this file (default {DOCS.relative_to(ROOT)}, "
                                                   "but none with --quick, --configs, --steps or --cpu-time)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single run, for isolated(): JSON in, JSON out
    return parser


def main() -> None:
    args = make_parser().parse_args()
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter
    for name in ("lightning.pytorch", "lightning.fabric"):  # no "GPU available" lines for every run
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.one:
        spec = json.loads(args.one)
        clock = getattr(time, spec["clock"])
        result = measure(spec["variant"], spec["overrides"], spec["steps"], spec["warmup"], spec["device"])
        print(json.dumps({"result": result}))
        return
    if args.checkpoint_cost:
        print(f"{machine_name(args.device)}, {DEFAULT_THREADS} threads, {datetime.date.today()}")
        for name, overrides, steps, warmup in plan(args):
            c = checkpoint_cost(name, overrides, steps, warmup, args.device)
            print(f"{name}: step {c['step_ms']:.1f} ms, save {c['save_ms']:.1f} ms (median of 10, "
                  f"{c['save_ms_range'][0]:.1f}-{c['save_ms_range'][1]:.1f}): {c['percent']:.3f} % of the training "
                  f"time with a save every {c['every']} steps", flush=True)
        return
    rounds = args.rounds or (3 if args.quick else 5)
    tag = args.device + ("-quick" if args.quick else "")
    json_path = args.json or ROOT / "outputs" / "bench" / f"throughput-{tag}.json"
    docs = docs_target(args)

    peak = {"fp32": peak_gflops(torch.float32, args.device), "bf16": peak_gflops(torch.bfloat16, args.device)}
    print(f"peak matmul GFLOP/s: fp32 {peak['fp32']:,.0f}  bf16 {peak['bf16']:,.0f}", flush=True)
    configs = []
    extra = tuple(v for v, on in (("module loop", args.module_loop), ("barebones", args.barebones)) if on)
    extra += (*(f"without {t}" for t in SWITCHED_OFF), COSTS) if args.tricks else ()
    for name, overrides, steps, warmup in plan(args):
        configs.append(bench_config(name, overrides, steps, warmup, rounds, args.best, args.device, extra))
    result = {"date": datetime.date.today().isoformat(), "device": args.device, "machine": machine_name(args.device),
              "threads": DEFAULT_THREADS, "torch": torch.__version__, "clock": clock.__name__,
              "command": "python bench/throughput.py " + " ".join(sys.argv[1:]), "best": args.best,
              "peak_gflops": peak, "configs": configs}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    if docs:
        write_docs(docs, result)
        print(f"table written to {docs}")
    print(f"results: {json_path}")
    print("best / plain: " + ", ".join(f"{c['name']} {c['best_ratio']:.2f}" for c in configs))
    for variant in (v for v in extra if v in EXTRA_VARIANTS):
        print(f"{variant} / plain ({EXTRA_VARIANTS[variant]}): "
              + ", ".join(f"{c['name']} {c[ratio_key(variant)]:.2f}" for c in configs))
    if args.tricks:
        print(tricks_table(configs))
    course = next((c for c in configs if c["name"] == "course"), configs[0])
    best = next((c for c in configs if c["name"] == BEST_AT), configs[-1])
    print(f"course_ratio={course['ratio']:.2f} best_ratio={best['best_ratio']:.2f}")


if __name__ == "__main__":
    main()
