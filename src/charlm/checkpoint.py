"""Checkpoints: written atomically, read with a clear error when missing, truncated or not charlm's."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from charlm.errors import CharlmError
from charlm.ptb import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go through `atomic_write`, so a kill at any moment leaves either the previous
    checkpoint or the new one, never half of one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), buffer.getbuffer())


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Load a charlm checkpoint on the CPU; any way it can be unusable is one CharlmError."""
    path = Path(path)
    if not path.is_file():
        raise CharlmError(f"checkpoint {path} does not exist; give the path of a .ckpt in a run's checkpoints/")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, random bytes, a pickle of something else...
        raise CharlmError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is truncated or not a "
                          f"checkpoint: use another one (best.ckpt, last.ckpt or a step checkpoint)") from None
    if not isinstance(ckpt, dict) or "charlm" not in ckpt or "state_dict" not in ckpt:
        raise CharlmError(f"{path} is not a charlm checkpoint (no vocabulary in it); use one written by train.py")
    return ckpt


def check_vocab(ckpt: dict[str, Any], vocab: list[str], path: str | os.PathLike) -> None:
    """A checkpoint only continues on the vocabulary it was trained on."""
    saved = ckpt["charlm"]["vocab"]
    if saved != list(vocab):
        extra = [s for s in vocab if s not in saved][:5]
        raise CharlmError(f"checkpoint {path} was trained on another vocabulary ({len(saved)} symbols) than "
                          f"the data given ({len(vocab)} symbols{', new: ' + repr(extra) if extra else ''}); "
                          f"use the data it was trained on")
