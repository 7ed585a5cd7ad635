"""Several processes of one launch (`accelerate launch`, `torchrun`): who writes, who waits.

Every file of a run has one writer, the main process; the others wait at a barrier where they need what it
wrote. After the last stage the processes part: each leaves the process group, the others exit, and the
main process alone goes on (forgetting matrix, merge, export, report) without waiting on a process that left.
"""
from __future__ import annotations

import os
from contextlib import nullcontext


def world_size() -> int:
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _group():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    """Wait for every process of the launch (nothing to wait for in a single process)."""
    dist = _group()
    if dist is not None:
        dist.barrier()


def main_process_first():
    """The main process runs the body first (a data cache, a model conversion), then the others read what it wrote."""
    if world_size() > 1:
        from accelerate import PartialState

        return PartialState().main_process_first()
    return nullcontext()


def part() -> None:
    """End the launch's collective part: all processes meet, then leave the process group. Afterwards
    evaluation and everything else run as in a single process."""
    dist = _group()
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
