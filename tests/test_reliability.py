"""Faults and bad input: exact resume after SIGKILL, atomic saves, interrupts, divergence, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from charlm import checkpoint
from charlm.errors import CharlmError
from conftest import FAST, ROOT, run_train, train_here, write_tiny_ptb

SMALL = ("data.batch_size=4", "data.eval_batch_size=2", "model.hidden_size=16", *FAST)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    """Tiny vocabulary but ~600 windows an epoch, so a run can be stopped mid-epoch."""
    return write_tiny_ptb(tmp_path_factory.mktemp("long") / "ptb", repeat=400)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, long_data) -> Path:
    run_dir = tmp_path_factory.mktemp("done") / "run"
    train_here(run_dir, "trainer.max_epochs=1", "trainer.limit_train_batches=50", *SMALL, data_dir=long_data)
    return run_dir


def snapshot(run_dir: Path) -> dict[str, str]:
    """Digest of every file a finished run wrote (Hydra's own .hydra/ and train.log aside)."""
    return {str(p.relative_to(run_dir)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}


def popen_train(*overrides: str, data_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, CHARLM_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.01)


# every regulariser on (charlm.model, data.variable_length): their masks and window lengths resume exactly too
REGULARISED = ("model.dropout=0.2", "model.dropout_hidden=0.3", "model.locked_dropout=true",
               "model.dropout_embedding=0.1", "model.weight_drop=0.3", "model.embedding_size=8", "model.tie_weights=true",
               "loss.ar_alpha=1", "loss.tar_beta=1", "data.variable_length=true")


@pytest.mark.parametrize("options", [pytest.param((), marks=pytest.mark.slow), REGULARISED],
                         ids=["course", "regularised"])  # the course's resume: the sweep tests too
def test_killed_run_resumes_to_the_same_result(options, long_data, tmp_path):
    common = (*SMALL, *options, "trainer.max_epochs=2", "checkpoint.every_n_train_steps=100")
    full = tmp_path / "full"
    assert run_train(f"hydra.run.dir={full}", *common, data_dir=long_data).returncode == 0
    expected = json.loads((full / "metrics.json").read_text())

    run = tmp_path / "killed"
    proc = popen_train(f"hydra.run.dir={run}", *common, data_dir=long_data)
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < step < 600  # mid-epoch 1

    proc = run_train(f"hydra.run.dir={run}", *common, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                     data_dir=long_data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["steps"] == expected["steps"]
    assert abs(resumed["valid"]["bpc"] - expected["valid"]["bpc"]) < 1e-4
    assert abs(resumed["test"]["bpc"] - expected["test"]["bpc"]) < 1e-4
    assert resumed["valid"]["bpc"] == expected["valid"]["bpc"]  # in fact bit-identical on CPU


SAVER = """
import sys, torch
from charlm.checkpoint import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
for i in range(10**6):
    io.save_checkpoint({"charlm": {"vocab": ["a"]}, "hyper_parameters": {}, "state_dict": {"w": torch.full((4_000_000,), float(i))}}, path)
    print(i, flush=True)
"""


def test_kill_during_checkpoint_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    for delay in (0.0, 0.013, 0.029, 0.047, 0.071):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # one save completed
        time.sleep(delay)  # then kill it at various points of the next saves
        proc.kill()
        proc.wait()
        ckpt = checkpoint.read(path)
        weights = ckpt["state_dict"]["w"]
        assert torch.equal(weights, torch.full_like(weights, weights[0].item()))  # one whole save, not a mix


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_last_checkpoint_and_says_how_to_resume(sig, long_data, tmp_path):
    run = tmp_path / "run"
    proc = popen_train(f"hydra.run.dir={run}", *SMALL, "trainer.max_epochs=50", data_dir=long_data)
    wait_for(run / "tensorboard" / "hparams.yaml", proc)
    time.sleep(4)  # well into training
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = run / "checkpoints" / "last.ckpt"
    assert checkpoint.read(last)["global_step"] > 0
    assert f"ckpt_path={last}" in out and "resume with: python train.py" in out
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"


def test_ctrl_c_stops_at_the_next_batch_and_a_second_one_at_once():
    from charlm.callbacks import SaveOnInterrupt

    before = signal.getsignal(signal.SIGINT)
    callback = SaveOnInterrupt("unused")
    callback.setup(None, None, "fit")
    try:
        signal.raise_signal(signal.SIGINT)  # the first: no exception here, wherever the code is
        with pytest.raises(KeyboardInterrupt):
            callback.on_train_batch_end(None, None, None, None, 0)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second: at once
    finally:
        callback.teardown(None, None, "fit")
    assert signal.getsignal(signal.SIGINT) is before


def test_same_seed_gives_identical_metrics(tiny_data, tmp_path):
    runs = [train_here(tmp_path / name, *SMALL, data_dir=tiny_data) for name in ("a", "b")]
    for split in ("train", "valid", "test"):
        assert runs[0][split] == runs[1][split]
    assert train_here(tmp_path / "c", *SMALL, "seed=7", data_dir=tiny_data)["valid"] != runs[0]["valid"]


def test_last_checkpoint_holds_the_final_weights_when_the_last_validation_is_not_the_best(tiny_data, tmp_path):
    run = tmp_path / "run"  # a learning rate too small to move a float32 weight: no validation beats the first
    metrics = train_here(run, *SMALL, "trainer.max_epochs=2", "optimizer=adamw", "optimizer.lr=1e-30",
                         data_dir=tiny_data)
    best, last = (checkpoint.read(run / "checkpoints" / name) for name in ("best.ckpt", "last.ckpt"))
    assert best["global_step"] < last["global_step"] == metrics["steps"]
    assert last["epoch"] == 1  # the second epoch's


def test_divergence_stops_at_once_and_keeps_the_best_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(CharlmError, match="^training diverged: the loss is nan at step 80 "):
        train_here(run, *SMALL, "trainer.max_epochs=3", "+callbacks.fault._target_=faults.NaNWeightsAt",
                   "+callbacks.fault.step=80", data_dir=tiny_data)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "diverged" in metrics["reason"]
    assert len(metrics["history"]) == 1  # one finished epoch (of 62 steps) before the fault
    best = checkpoint.read(run / "checkpoints" / "best.ckpt")
    assert best["global_step"] < 80
    assert all(torch.isfinite(v).all() for v in best["state_dict"].values())


# --- bad input: one clear line, non-zero exit, the finished run's files untouched --------------------

def corrupt(kind: str, data: Path, finished: Path, tmp: Path) -> tuple[list[str], Path | None]:
    """Make one kind of bad input; returns extra overrides and the data dir to use."""
    if kind == "missing data dir":
        return ["data.download=false"], tmp / "nowhere"
    if kind == "empty data dir":
        (tmp / "empty").mkdir()
        return ["data.download=false"], tmp / "empty"
    if kind in ("truncated file", "empty file", "unknown symbol"):
        bad = write_tiny_ptb(tmp / "bad", repeat=400)
        target = bad / "ptb.char.valid.txt"
        if kind == "truncated file":
            target.write_bytes(target.read_bytes()[:100])
        elif kind == "empty file":
            target.write_bytes(b"")
        else:  # a symbol training never saw, with matching checksums: the vocabulary check must catch it
            target.write_text(target.read_text() + "Z \n ")
            from charlm.ptb import md5sum
            (bad / "MD5SUMS").write_text("".join(f"{md5sum(f)}  {f.name}\n" for f in sorted(bad.glob("ptb.*.txt"))))
        return [], bad
    if kind == "unknown key":
        return ["model.hiden_size=64"], data
    if kind == "value out of range":
        return ["model.dropout=1.5"], data
    if kind.endswith("checkpoint"):
        path = tmp / "x.ckpt"
        good = (finished / "checkpoints" / "last.ckpt").read_bytes()
        if kind == "truncated checkpoint":
            path.write_bytes(good[: len(good) // 2])
        elif kind == "non-charlm checkpoint":
            torch.save({"state_dict": {}, "epoch": 3}, path)
        elif kind == "garbage checkpoint":
            path.write_bytes(os.urandom(5000))
        else:  # trained on another vocabulary
            other = tmp / "other"
            other.mkdir()
            for f in data.glob("ptb.char.*.txt"):
                (other / f.name).write_text(f.read_text().replace("c", "q"))
            return [f"ckpt_path={finished / 'checkpoints' / 'last.ckpt'}", "data.verify=false"], other
        return [f"ckpt_path={path}"], data
    if kind == "unwritable output dir":
        return ["hydra.run.dir=/proc/charlm-run"], data
    raise ValueError(kind)


BAD = {
    "missing data dir": "nowhere/ptb.char.train.txt does not exist",
    "empty data dir": "empty/ptb.char.train.txt does not exist",
    "truncated file": "ptb.char.valid.txt fails its checksum",
    "empty file": "ptb.char.valid.txt fails its checksum",
    "unknown symbol": "holds the symbol 'Z'",
    "unknown key": "Could not override 'model.hiden_size'",
    "value out of range": "model.dropout=1.5 is out of range",
    "truncated checkpoint": "is not a readable charlm checkpoint",
    "non-charlm checkpoint": "is not a charlm checkpoint",
    "garbage checkpoint": "is not a readable charlm checkpoint",
    "another-vocabulary checkpoint": "was trained on another vocabulary",
    "unwritable output dir": "/proc/charlm-run",
}


CLI = ("unknown key", "unwritable output dir")


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_is_one_clear_error_and_damages_nothing(kind, long_data, finished_run, tmp_path):
    before = snapshot(finished_run)
    extra, data_dir = corrupt(kind, long_data, finished_run, tmp_path)
    if kind in CLI:  # Hydra's composition and its output directory: only a command line shows these
        run_dir = [] if any(e.startswith("hydra.run.dir") for e in extra) else [f"hydra.run.dir={finished_run}"]
        proc = run_train(*run_dir, *SMALL, "trainer.max_epochs=2", *extra, data_dir=data_dir)
        assert proc.returncode != 0
        assert BAD[kind] in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    else:  # a CharlmError: the one `error: ...` line and exit 2 of every entry point (charlm.errors)
        with pytest.raises(CharlmError) as error:
            train_here(finished_run, *SMALL, "trainer.max_epochs=2", *extra, data_dir=data_dir)
        assert BAD[kind] in str(error.value) and "\n" not in str(error.value)
    assert snapshot(finished_run) == before
