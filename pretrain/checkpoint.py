"""Atomic training checkpoints, resume, and the teacher-backbone export that ``ViTExtractor`` loads.

A checkpoint is one ``torch.save`` dict readable with ``weights_only=True``::

    student, teacher     MultiCropWrapper state dicts (keys backbone.* and head.*)
    optimizer            AdamW state
    loss                 DINOLoss state (the centre)
    step, epoch          completed global steps; the epoch the next step belongs to
    config               PretrainConfig as a dict
    rng                  torch CPU (and CUDA) generator states of every process
    vitdense_backbone    metadata so ``ViTExtractor(weights=checkpoint.pth)`` rebuilds the teacher

Files are written to a temp file in the same folder and renamed, so a crash mid-write leaves the
previous file intact.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vitdense.backbones import FORMAT_KEY, atomic_write
from vitdense.errors import CheckpointError

CHECKPOINT_KEYS = ("student", "teacher", "optimizer", "loss", "step", "config")


def rng_state() -> dict[str, Any]:
    """This process's torch generator states (CPU, and CUDA when present)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Write a training checkpoint atomically."""
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def resolve_resume(resume: str | os.PathLike) -> Path:
    """A checkpoint path from ``--resume`` (a file, or a run folder holding checkpoint.pth)."""
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoint.pth"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint to resume from not found")
    return path


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Read a training checkpoint; CheckpointError (one line, names the file) when it is not one.

    ``mmap``: map the tensors instead of reading them (cheap when only ``config``/``step`` are needed).
    """
    path = resolve_resume(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # zip/pickle/unsafe-global errors all mean "not a checkpoint of ours"
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable training checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        found = ", ".join(list(ckpt)[:6]) if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = " (it is a backbone export, not a training checkpoint)" if isinstance(ckpt, dict) \
            and FORMAT_KEY in ckpt and "student" not in ckpt else ""
        raise CheckpointError(f"{path}: not a pretrain training checkpoint{hint}; found {found}")
    return ckpt


def check_compatible(path: str | os.PathLike, saved: dict[str, Any], current: dict[str, Any],
                     fields: tuple[str, ...]) -> None:
    """CheckpointError listing the model options that differ between a checkpoint and this run."""
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)!r} (run: {current.get(k)!r})"
             for k in fields if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"{path}: checkpoint was trained with " + ", ".join(diffs)
                              + "; resume with the same model options")
