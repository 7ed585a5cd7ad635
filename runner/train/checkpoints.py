"""Trainer checkpoints of a stage (checkpoints/checkpoint-<step>/): which one a rerun resumes from."""
from __future__ import annotations

import shutil
from pathlib import Path


def step_of(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def is_complete_checkpoint(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and any(path.glob("adapter_model.*")) and \
        (path / "optimizer.pt").is_file()


def last_checkpoint(checkpoints: Path, remove_broken: bool = True) -> Path | None:
    """The newest complete checkpoint; a half-written one (killed while saving) is removed when
    `remove_broken` (only one process of a launch may remove anything)."""
    for path in sorted(checkpoints.glob("checkpoint-*"), key=step_of, reverse=True):
        if is_complete_checkpoint(path):
            return path
        if remove_broken:
            shutil.rmtree(path, ignore_errors=True)
    return None
