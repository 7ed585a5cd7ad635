"""What every benchmark shares: the machine it ran on, peaks measured in the same run, peak RSS of a
child process, and one results file per benchmark (bench/results/<name>.json).

Absolute times on a shared 2-core machine mean little; each benchmark runs tunebook and its baseline in
one invocation and reports ratios. Peaks (matmul GFLOP/s, memory bandwidth) are measured in the same run so
utilization figures compare like with like.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    """CPU model, cores, the bf16 instruction sets, memory and library versions."""
    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16_isa": sorted(f for f in flags if f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")),
            "memory_gib": round(mem_gib, 1), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def matmul_peak_gflops(dtype_name: str, n: int = 2048, seconds: float = 1.5) -> float:
    """Best-of-rounds n×n matmul throughput for a dtype: the peak that MFU figures divide by."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return round(best, 1)


def memory_bandwidth_gbs(threads: int = 1, mib: int = 1024, seconds: float = 1.5) -> float:
    """Best-of-rounds read bandwidth of a vectorised float32 sum over a buffer far larger than the caches
    (what decoding streams). A numpy float64 sum is compute-bound on these CPUs and reads less."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
        buf.sum()
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            buf.sum()
            best = max(best, buf.numel() * 4 / (time.perf_counter() - start) / 1e9)
        return round(best, 2)
    finally:
        torch.set_num_threads(before)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def in_child(fn, *args, **kwargs):
    """Run fn(*args, **kwargs) in a fresh spawned process: its own peak RSS, no state shared with the
    other side of a comparison. fn must be a module-level function; it returns a JSON-able dict, to
    which the child's peak_rss_mib is added."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measured, fn, args, kwargs).result()


def _measured(fn, args, kwargs):
    result = fn(*args, **kwargs)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_result(name: str, result: dict, machine_info: dict | None = None) -> Path:
    """bench/results/<name>.json, written whole (a failed run never leaves half a file)."""
    from runner.atomic import write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "commit": git_commit(), "machine": machine_info or machine(), **result}
    path = RESULTS / f"{name}.json"
    write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")
