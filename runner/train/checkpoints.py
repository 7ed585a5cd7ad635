"""Trainer checkpoints of a stage (checkpoints/checkpoint-<step>/): which one a rerun resumes from."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

from ..run_dir import whole_safetensors


def step_of(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


# The model and optimizer files of a checkpoint: one process or DDP (the adapter, optimizer.pt); FSDP with a full
# state dict (the adapter and pytorch_model_fsdp.bin, optimizer.bin); FSDP with a sharded state dict
# (pytorch_model_fsdp_0/ and optimizer_0/, one file per process, from torch.distributed.checkpoint).
MODEL_FILES = ("adapter_model.*", "pytorch_model_fsdp*")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "optimizer_0")


def is_complete_checkpoint(path: Path) -> bool:
    """trainer_state.json is written last, after every process has written its part; the files a resume reads
    are there and whole as far as can be told without loading them: the state parses, the adapter's
    safetensors holds the bytes its header promises, an optimizer or scheduler .pt is a whole zip archive (a
    cut one has no central directory), and the scheduler is there beside a single-file optimizer (without it
    the learning-rate schedule would silently start over)."""
    if not (any(any(path.glob(pattern)) for pattern in MODEL_FILES) and
            any(any(path.glob(pattern)) for pattern in OPTIMIZER_FILES)):
        return False
    try:
        if not isinstance(json.loads((path / "trainer_state.json").read_text()), dict):
            return False
    except (OSError, ValueError):
        return False
    if any((path / name).is_file() for name in ("optimizer.pt", "optimizer.bin")) and \
            not (path / "scheduler.pt").is_file():
        return False
    if not all(whole_safetensors(f) for f in path.glob("adapter_model.safetensors")):
        return False
    return all(zipfile.is_zipfile(f) for name in ("optimizer.pt", "scheduler.pt") if (f := path / name).is_file())


def finished_at(checkpoint: Path) -> bool:
    """The checkpoint was saved at the stage's last step: resuming from it must train no step more."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        return 0 < int(state.get("max_steps") or 0) <= int(state.get("global_step") or 0)
    except (OSError, ValueError, TypeError):
        return False


def last_checkpoint(checkpoints: Path, remove_broken: bool = True) -> Path | None:
    """The newest complete checkpoint; a half-written one (killed while saving) is removed when
    `remove_broken` (only one process of a launch may remove anything)."""
    for path in sorted(checkpoints.glob("checkpoint-*"), key=step_of, reverse=True):
        if is_complete_checkpoint(path):
            return path
        if remove_broken:
            shutil.rmtree(path, ignore_errors=True)
    return None
