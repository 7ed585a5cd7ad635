"""Several processes of one launch (`accelerate launch`, `torchrun`), on one machine or several: who writes,
who waits.

Every file of a run has one writer, the job's main process (rank 0); the others wait at a barrier where they
need what it wrote. What a process makes for itself in the cache (a converted base model, a tokenized
dataset) is made once per machine, since machines need not share a filesystem: first by the job's main
process, then by each other machine's main process (a cache hit where the cache is shared), then read by the
rest. After the last stage the processes part: each leaves the process group, the others exit, and the main
process alone goes on (forgetting matrix, merge, export, report) without waiting on a process that left.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

# Long enough for the main process to convert a base model or tokenize a large dataset while the others wait.
BARRIER_TIMEOUT = timedelta(hours=2)


def world_size() -> int:
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def is_local_main_process() -> bool:
    """The first process on its machine."""
    return local_rank() == 0


def shards_parameters() -> str | None:
    """'fsdp' or 'zero3' when the launch shards the model's parameters across processes (then a 4-bit base
    needs its quantized weights stored in a float dtype, and the adapter is gathered before it is saved)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and \
            os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "zero3"
    return None


def _group():
    """The launch's process group, started here when the launch has several processes and nobody started it
    yet (accelerate and the trainer then use this one)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or world_size() == 1:
        return None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            backend = "cuda:nccl,cpu:gloo"  # gloo too: FSDP's CPU offload and CPU-side gathers need it
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    return dist


def barrier() -> None:
    """Wait for every process of the launch (nothing to wait for in a single process)."""
    dist = _group()
    if dist is not None:
        dist.barrier()


@contextmanager
def main_process_first():
    """Run the body on the job's main process, then on each other machine's main process, then on every other
    process: what the body writes to the cache is made once per machine, and never by two processes at once
    on a cache the machines share."""
    if world_size() == 1:
        yield
        return
    main, local_main = is_main_process(), is_local_main_process()
    if not main:
        barrier()                  # 1: the job's main process is done
        if not local_main:
            barrier()              # 2: this machine's main process is done
    yield
    if main:
        barrier()
    if local_main:
        barrier()


def part() -> None:
    """End the launch's collective part: all processes meet, then leave the process group. Afterwards
    evaluation and everything else run as in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
