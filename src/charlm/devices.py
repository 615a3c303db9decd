"""One device per job in a parallel sweep: a pool of device ids that a job takes when it starts and gives
back when it ends.

Jobs of a grid take very different times (BPTT length 5 against 50), so dealing ids out by job number
(`job_num % K`) puts two running jobs on one GPU. Instead every id has a lock file, and a job holds the
first free one (`fcntl.flock`) for as long as it runs, waiting while all are taken. The kernel drops a
lock when its holder exits, crashed or not, so a dead job never keeps its device.

`hydra/launcher=parallel` (conf/hydra/launcher/parallel.yaml) runs as many jobs at once as the pool has
ids, and adds `device_pool` to the config: integer ids are GPU indices, any other name is a CPU slot.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from charlm.errors import CharlmError
from charlm.files import write_json

log = logging.getLogger(__name__)


def cpu_count() -> int:
    """The cores this process may run on (a container's or a SLURM allocation's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pool_ids(ids=None, cpu_jobs: int | None = None) -> list:
    """The ids to share out: those given, else every visible GPU, else `cpu_jobs` CPU slots (one per core)."""
    if ids:
        return list(ids)
    if torch.cuda.is_available():
        return list(range(torch.cuda.device_count()))
    return [f"cpu{i}" for i in range(cpu_jobs or cpu_count())]


@contextmanager
def hold(ids: list, lock_dir: Path, poll_s: float = 0.2) -> Iterator:
    """Hold the first free id of `ids` until the block ends; wait while every id is held by another job."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for device in ids:
            lock = open(lock_dir / f"{device}.lock", "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            try:
                yield device
            finally:
                lock.close()  # closing the file drops the lock
            return
        time.sleep(poll_s)


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun (`python train.py -m ...`)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _one_device(devices) -> bool:
    return devices in (1, None) or (OmegaConf.is_list(devices) or isinstance(devices, list)) and len(devices) == 1


def _check_one_device(cfg: DictConfig) -> None:
    """A job of a local sweep runs in one process: Lightning would start DDP's other ranks by running the
    whole command line again, `-m` included, so they would start the sweep once more."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    launched_outside = any(k in os.environ for k in ("SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))
    if not _one_device(devices) and not launched_outside:
        raise CharlmError(f"trainer.devices={devices} in a local sweep: a sweep job runs on one device; run a "
                          f"multi-device job on its own (without -m), or sweep on SLURM with hydra/launcher=slurm "
                          f"and hydra.launcher.tasks_per_node=hydra.launcher.gpus_per_node=<devices>")


def _use(cfg: DictConfig, device) -> None:
    """Point the trainer at the held device: a GPU index, or the CPU for a named slot."""
    if isinstance(device, int):
        if device >= torch.cuda.device_count():
            raise CharlmError(f"device_pool.ids holds GPU {device} but torch sees {torch.cuda.device_count()} "
                              f"CUDA devices; list ids in 0..{torch.cuda.device_count() - 1}, or null for all")
        cfg.trainer.accelerator, cfg.trainer.devices = "gpu", [device]
    else:
        cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 1


@contextmanager
def claim(cfg: DictConfig) -> Iterator:
    """Run a job on its own device. Outside a sweep this does nothing. In a sweep it checks that the job
    asks for one device; with `device_pool` (hydra/launcher=parallel) it holds one id of the pool for the
    whole job, points the trainer at it, gives the job its share of the CPU threads and records all that,
    with the times it held the device, in `device.json` beside metrics.json."""
    if not in_sweep():
        yield None
        return
    _check_one_device(cfg)
    pool = cfg.get("device_pool")
    if pool is None:
        yield None
        return
    ids = pool_ids(pool.ids, pool.cpu_jobs)
    # a host's own devices: nodes that share a sweep directory (one study from several nodes) do not share locks
    lock_dir = Path(pool.lock_dir or Path(HydraConfig.get().sweep.dir) / ".devices" / socket.gethostname())
    threads = max(1, cpu_count() // len(ids))
    with hold(ids, lock_dir) as device:
        acquired = time.time()
        try:
            _use(cfg, device)
            torch.set_num_threads(threads)
            yield device
        finally:
            record = {"device": device, "threads": threads, "pid": os.getpid(),
                      "acquired": acquired, "released": time.time()}
            write_json(Path(cfg.run_dir) / "device.json", record)
