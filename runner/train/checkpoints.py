"""Trainer checkpoints of a stage (checkpoints/checkpoint-<step>/): which one a rerun resumes from."""
from __future__ import annotations

import shutil
from pathlib import Path


def step_of(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


# The model and optimizer files of a checkpoint: one process or DDP (the adapter, optimizer.pt); FSDP with a full
# state dict (the adapter and pytorch_model_fsdp.bin, optimizer.bin); FSDP with a sharded state dict
# (pytorch_model_fsdp_0/ and optimizer_0/, one file per process, from torch.distributed.checkpoint).
MODEL_FILES = ("adapter_model.*", "pytorch_model_fsdp*")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "optimizer_0")


def is_complete_checkpoint(path: Path) -> bool:
    """trainer_state.json is written last, after every process has written its part."""
    return (path / "trainer_state.json").is_file() and \
        any(any(path.glob(pattern)) for pattern in MODEL_FILES) and \
        any(any(path.glob(pattern)) for pattern in OPTIMIZER_FILES)


def last_checkpoint(checkpoints: Path, remove_broken: bool = True) -> Path | None:
    """The newest complete checkpoint; a half-written one (killed while saving) is removed when
    `remove_broken` (only one process of a launch may remove anything)."""
    for path in sorted(checkpoints.glob("checkpoint-*"), key=step_of, reverse=True):
        if is_complete_checkpoint(path):
            return path
        if remove_broken:
            shutil.rmtree(path, ignore_errors=True)
    return None
