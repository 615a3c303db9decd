"""Which precision a run can train in on this machine."""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 (AVX512-BF16 or AMX). Elsewhere oneDNN's bf16 LSTM kernel fails
    outright ("could not create a primitive descriptor") and bf16 matmuls are emulated, 20-40x slower than
    float32. torch has no public flag that says so, so a one-step LSTM under bf16 autocast tries (its
    initialisation drawn from a forked RNG, so that asking leaves a seeded run's random numbers alone)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(4, 4)(torch.zeros(1, 1, 4))
    except RuntimeError:
        return False
    return True


def usable(precision: str, accelerator: str = "auto", bf16_cpu: bool | None = None) -> str:
    """`precision`, or 32-true where it asks for bf16 on a CPU that cannot run it in an LSTM, with a warning
    (the presets ask for bf16, which is fast where the CPU has it; elsewhere they would not run at all).
    `bf16_cpu`: whether the CPU has bf16 units (None: this one's, cpu_has_bf16)."""
    precision = str(precision)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and precision.startswith("bf16") and not (cpu_has_bf16() if bf16_cpu is None else bf16_cpu):
        log.warning(f"trainer.precision={precision}: this CPU ({torch.backends.cpu.get_cpu_capability()}) has "
                    f"no bf16 LSTM kernel, so the run trains in 32-true; pass trainer.precision=32-true to say so")
        return "32-true"
    return precision
