"""Checkpoints: written atomically, read with a clear error when missing, truncated or not charlm's."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from charlm.errors import CharlmError
from charlm.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go through `atomic_write`, so a kill at any moment leaves either the previous
    checkpoint or the new one, never half of one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), buffer.getbuffer())


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Load a charlm checkpoint on the CPU; any way it can be unusable is one CharlmError.

    weights_only: the project's checkpoints hold tensors and plain values only, and loading one must
    never run code that came with the file."""
    path = Path(path).expanduser()
    if path.is_dir():
        hint = next((p for p in (path / "checkpoints" / "best.ckpt", path / "best.ckpt") if p.is_file()), None)
        raise CharlmError(f"{path} is a directory; give a checkpoint file" + (f", e.g. {hint}" if hint else ""))
    if not path.is_file():
        raise CharlmError(f"checkpoint {path} does not exist; give a .ckpt file written by python train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated zip, random bytes, pickled objects
        raise CharlmError(f"{path} is not a readable charlm checkpoint: it is truncated, not a file torch.save "
                          f"wrote, or holds pickled code besides tensors and plain values; use another one "
                          f"(best.ckpt, last.ckpt or a step checkpoint written by python train.py)") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)
            and isinstance(ckpt.get("hyper_parameters"), dict)
            and isinstance(ckpt.get("charlm"), dict) and isinstance(ckpt["charlm"].get("vocab"), list)):
        raise CharlmError(f"{path} is not a charlm checkpoint (no charlm vocabulary, hyper-parameters and "
                          f"weights); use a .ckpt written by python train.py")
    return ckpt


def check_vocab(ckpt: dict[str, Any], vocab: list[str], path: str | os.PathLike) -> None:
    """A checkpoint only continues on the vocabulary it was trained on."""
    saved = ckpt["charlm"]["vocab"]
    if saved != list(vocab):
        extra = [s for s in vocab if s not in saved][:5]
        raise CharlmError(f"checkpoint {path} was trained on another vocabulary ({len(saved)} symbols) than "
                          f"the data given ({len(vocab)} symbols{', new: ' + repr(extra) if extra else ''}); "
                          f"use the data it was trained on")


def epochs_trained(ckpt: dict[str, Any]) -> int:
    """The epochs whose training the checkpoint's run had finished (Lightning's fit-loop progress)."""
    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", 0))


def finished(ckpt: dict[str, Any], max_epochs: int | None) -> bool:
    """Whether the checkpoint's run has trained all of `max_epochs` (None or -1: no limit)."""
    return max_epochs is not None and max_epochs != -1 and epochs_trained(ckpt) >= max_epochs


def check_unfinished(ckpt: dict[str, Any], max_epochs: int, path: str | os.PathLike) -> None:
    """Resuming a run that already trained its `max_epochs` would train nothing and overwrite its results:
    refused, saying how to extend it."""
    done = epochs_trained(ckpt)
    if finished(ckpt, max_epochs):
        raise CharlmError(f"checkpoint {path} is of a finished run: it trained {done} of trainer.max_epochs="
                          f"{max_epochs} epochs; to train it further, raise trainer.max_epochs above {done}")


def net_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The network a checkpoint holds, {"_target_": class path, **options}: as it says, or for a checkpoint
    written before networks were plug-ins (no "format"), the course's LSTM with the options its
    hyper-parameters list."""
    if "net" in ckpt["charlm"]:
        return dict(ckpt["charlm"]["net"])
    import inspect

    from charlm.nets import LSTMLM, target_of

    options = inspect.signature(LSTMLM).parameters
    hparams = ckpt["hyper_parameters"]
    return {"_target_": target_of(LSTMLM), **{k: v for k, v in hparams.items() if k in options and k != "vocab_size"}}


def symbols(ckpt: dict[str, Any]) -> str:
    """The name of the checkpoint's kind of symbol (charlm.symbols): as it says, or as an earlier version's
    `level` said."""
    return ckpt["charlm"].get("symbols") or ckpt["charlm"].get("level") or ckpt["hyper_parameters"].get("level", "char")
