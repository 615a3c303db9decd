"""The config's own resolvers (`${charlm.NAME:...}`): registered by the entry point before Hydra composes."""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

from charlm import devices

MAX_DIRNAME = 128  # file systems allow 255 bytes a name; a sweep job's overrides can spell more


def dirname(overrides: str) -> str:
    """A sweep job's directory name from its overrides (hydra.job.override_dirname), kept readable and short
    enough for any file system: a long one keeps its start and ends in an MD5 of the whole, so two jobs
    never share a name."""
    if not overrides:
        return "default"
    if len(overrides.encode()) <= MAX_DIRNAME:
        return overrides
    digest = hashlib.md5(overrides.encode()).hexdigest()[:12]
    return overrides.encode()[:MAX_DIRNAME - 13].decode(errors="ignore") + "-" + digest


def register() -> None:
    """`charlm.pool_size` (conf/hydra/launcher/parallel.yaml: one job per device of the pool) and
    `charlm.dirname` (conf/hydra/default.yaml: a sweep job's directory)."""
    resolvers = {"charlm.pool_size": lambda ids, cpu_jobs: len(devices.pool_ids(ids, cpu_jobs)),
                 "charlm.dirname": dirname}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
