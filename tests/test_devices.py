"""The device pool of parallel sweeps: one device per running job, however unequal the jobs, every device used."""

import json
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from charlm import devices, precision
from charlm.errors import CharlmError
from conftest import FAST, compose_config, run_train


def assert_one_job_per_device(records: list[tuple]) -> None:
    """records: (device, start, end) per job; no two jobs on one device may overlap in time."""
    by_device: dict = {}
    for device, start, end in records:
        assert start <= end
        by_device.setdefault(device, []).append((start, end))
    for device, spans in by_device.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end, f"two running jobs held {device}"


def _job(args: tuple) -> tuple:
    ids, lock_dir, seconds = args
    with devices.hold(ids, Path(lock_dir), poll_s=0.005) as device:
        start = time.time()
        time.sleep(seconds)
        return device, start, time.time()


def test_pool_never_gives_one_device_to_two_running_jobs(tmp_path):
    ids = ["gpu-a", "gpu-b", "gpu-c"]
    # Unequal lengths (like BPTT 5 against 50), and more workers than devices, so jobs must wait for one.
    seconds = [0.3, 0.02, 0.15, 0.02, 0.02, 0.25, 0.08, 0.02, 0.12, 0.02, 0.3, 0.02, 0.05, 0.2]
    with ProcessPoolExecutor(5, mp_context=get_context("fork")) as pool:
        records = list(pool.map(_job, [(ids, str(tmp_path), s) for s in seconds]))
    assert_one_job_per_device(records)
    assert {r[0] for r in records} == set(ids)
    # The pool kept every device busy: at some moment three jobs ran at once.
    assert max(sum(s <= t < e for _, s, e in records) for _, t, _ in records) == len(ids)


def test_a_killed_job_gives_its_device_back(tmp_path):
    ctx = get_context("fork")
    held = ctx.Event()

    def hold_forever():
        with devices.hold(["only"], tmp_path):
            held.set()
            time.sleep(60)

    proc = ctx.Process(target=hold_forever)
    proc.start()
    assert held.wait(10)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    start = time.time()
    with devices.hold(["only"], tmp_path, poll_s=0.01) as device:
        assert device == "only" and time.time() - start < 2


def test_parallel_launcher_runs_one_job_per_device():
    cfg = compose_config("hydra/launcher=parallel", "device_pool.ids=[0,1,3]", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 3 and cfg.device_pool.ids == [0, 1, 3]
    cfg = compose_config("hydra/launcher=parallel", "device_pool.cpu_jobs=2", hydra=True)
    assert cfg.hydra.launcher.n_jobs == len(devices.pool_ids(None, 2))
    if not torch.cuda.is_available():
        assert devices.pool_ids(None, 2) == ["cpu0", "cpu1"]
        assert devices.pool_ids(None, None) == [f"cpu{i}" for i in range(devices.cpu_count())]


def test_parallel_sweep_records_its_devices_and_never_shares_one(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    # Jobs of unequal lengths (1 or 3 epochs, BPTT 5 or 20) and two that fail at once (seq_len 0).
    proc = run_train("-m", "hydra/launcher=parallel", "device_pool.ids=[dev0,dev1]", f"hydra.sweep.dir={sweep}",
                     "data.seq_len=0,5,20", "trainer.max_epochs=1,3", "data.batch_size=4", "data.eval_batch_size=2",
                     "model.hidden_size=16", *FAST, data_dir=tiny_data)
    assert proc.returncode == 1, proc.stderr[-3000:]  # some jobs failed; the sweep and its report did not
    jobs = sorted(p.parent for p in sweep.glob("*/.hydra"))
    assert len(jobs) == 6
    records, statuses = [], {}
    for job in jobs:
        record = json.loads((job / "device.json").read_text())
        records.append((record["device"], record["acquired"], record["released"]))
        assert record["threads"] == max(1, devices.cpu_count() // 2)
        statuses[job.name] = json.loads((job / "metrics.json").read_text())["status"]
    assert_one_job_per_device(records)
    assert {r[0] for r in records} == {"dev0", "dev1"}
    assert sorted(statuses.values()) == ["completed"] * 4 + ["failed"] * 2
    assert all(s == "failed" for name, s in statuses.items() if "data.seq_len=0" in name)
    trained = [r for r, job in zip(records, jobs) if "data.seq_len=0" not in job.name]
    assert any(a[1] < b[2] and b[1] < a[2] for i, a in enumerate(trained) for b in trained[i + 1:]), \
        "no two jobs ever ran at the same time"
    summary = (sweep / "summary.csv").read_text()
    assert summary.count("completed") == 4 and summary.count("failed") == 2


def test_job_is_pointed_at_its_device():
    cfg = OmegaConf.create({"trainer": {"accelerator": "auto", "devices": 1}})
    devices._use(cfg, "cpu1")
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("cpu", 1)
    if torch.cuda.is_available():
        devices._use(cfg, 0)
        assert (cfg.trainer.accelerator, list(cfg.trainer.devices)) == ("gpu", [0])
    with pytest.raises(CharlmError, match="CUDA devices; list ids in"):
        devices._use(cfg, torch.cuda.device_count())  # one past the last GPU


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_on_a_cpu_without_bf16_trains_in_32_true_and_says_so(has_bf16, caplog):
    """A preset's bf16-mixed runs as asked where the CPU has bf16, else in 32-true with a warning (oneDNN
    has no bf16 LSTM kernel there: the run would fail at its first step)."""
    cfg = compose_config("experiment=fast_2x200", "trainer.accelerator=cpu")
    used = precision.usable(cfg.trainer.precision, cfg.trainer.accelerator, bf16_cpu=has_bf16)
    assert used == ("bf16-mixed" if has_bf16 else "32-true")
    assert ("trains in 32-true" in caplog.text) is not has_bf16
