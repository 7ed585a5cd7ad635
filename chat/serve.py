"""Start the Chainlit chat app (chat/app.py) over a GGUF file: `tunebook chat` calls `serve`.

Chainlit reads and writes its files (`.chainlit/config.toml`, translations, `chainlit.md`, `.files/`)
in its app root and loads `.env` from its working directory. The server therefore runs with both set
to `chat/chainlit_home/`, which ships those files, so nothing lands in the user's folders. Settings
reach the app through the environment variables below. This module does not import Chainlit
(importing it writes into the working directory).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from chat.engine import ChatError, check_gguf

CHAT_DIR = Path(__file__).resolve().parent
APP_PATH = CHAT_DIR / "app.py"
CHAINLIT_HOME = CHAT_DIR / "chainlit_home"

# What serve() tells the app (chat/app.py reads these).
ENV_MODEL = "TUNEBOOK_CHAT_MODEL"  # path of the GGUF file
ENV_SYSTEM_PROMPT = "TUNEBOOK_CHAT_SYSTEM_PROMPT"  # replaces the VetAI persona
ENV_TITLE = "TUNEBOOK_CHAT_TITLE"  # assistant name shown in the UI
ENV_N_CTX = "TUNEBOOK_CHAT_N_CTX"  # context window (tokens)
ENV_MAX_TOKENS = "TUNEBOOK_CHAT_MAX_TOKENS"  # default reply length (tokens)
ENV_THREADS = "TUNEBOOK_CHAT_THREADS"  # llama.cpp threads (default: all cores this process may use)
ENV_PARALLEL = "TUNEBOOK_CHAT_PARALLEL"  # conversations decoded together (default: chat/engine.py DEFAULT_PARALLEL)
ENV_SAMPLING = "TUNEBOOK_CHAT_SAMPLING"  # JSON: the run's `chat:` settings over chat/engine.py CHAT_SAMPLING
ENV_DEBUG_LOG = "TUNEBOOK_CHAT_DEBUG_LOG"  # tests: a JSONL file recording what each generation saw

# Inherited variables that would make Chainlit talk to the outside (a data layer, OAuth, Literal AI)
# or change how its CLI runs (click reads CI, DEBUG, WATCH, ... as option defaults).
# serve() sets the model, prompt and title itself; the other TUNEBOOK_CHAT_* settings pass through.
_DROPPED_ENV_PREFIXES = ("CHAINLIT_", "LITERAL_", "OAUTH_")
_DROPPED_ENV = {"DATABASE_URL", "BUCKET_NAME", "CI", "DEBUG", "WATCH", "HEADLESS", "NO_CACHE", "RUN_TARGET",
                ENV_MODEL, ENV_SYSTEM_PROMPT, ENV_TITLE}
_OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "OTEL_SDK_DISABLED": "true",
    "TRACELOOP_TELEMETRY": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def chainlit_home() -> Path:
    """Chainlit's app root: the shipped folder, or a copy of it when that is read-only (site-packages)."""
    if os.access(CHAINLIT_HOME, os.W_OK):
        return CHAINLIT_HOME
    copy = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunebook" / "chainlit_home"
    shutil.copytree(CHAINLIT_HOME, copy, dirs_exist_ok=True)
    return copy


def server_env(
    gguf_path: Path,
    system_prompt: str | None = None,
    title: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_DROPPED_ENV_PREFIXES) and k not in _DROPPED_ENV
    }
    env.update(_OFFLINE_ENV)
    home = chainlit_home()
    env["CHAINLIT_APP_ROOT"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    # The app imports `chat.engine`: make the package importable from any working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHAT_DIR.parent), env.get("PYTHONPATH")]))
    env[ENV_MODEL] = str(gguf_path.resolve())
    if system_prompt is not None:
        env[ENV_SYSTEM_PROMPT] = system_prompt
    if title:
        env[ENV_TITLE] = title
    env.update(extra or {})
    return env


def check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        busy = e.errno in (errno.EADDRINUSE, errno.EACCES)  # taken, or a port below 1024 without the right
        fix = "choose another --port" if busy else "check --host: an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
        raise ChatError(f"cannot listen on {host}:{port}: {e.strerror or e} ({fix})") from e


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(
    gguf_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    system_prompt: str | None = None,
    title: str | None = None,
    headless: bool = True,
    env: dict[str, str] | None = None,
    stdout=None,
    stderr=None,
    parallel: int | None = None,
) -> subprocess.Popen:
    """Start the chat server in a child process and return it at once (see `wait_ready`)."""
    gguf_path = check_gguf(gguf_path)
    check_port(host, port)
    cmd = [sys.executable, "-m", "chainlit", "run", str(APP_PATH), "--host", host, "--port", str(port)]
    if headless:
        cmd.append("--headless")
    extra = {**(env or {}), **({ENV_PARALLEL: str(parallel)} if parallel else {})}
    child_env = server_env(gguf_path, system_prompt, title, extra)
    return subprocess.Popen(cmd, cwd=child_env["CHAINLIT_APP_ROOT"], env=child_env, stdout=stdout, stderr=stderr)


def wait_ready(proc: subprocess.Popen, host: str, port: int, timeout: float = 120.0, log_path: Path | None = None) -> str:
    """Wait until the server answers on /health; return its URL. Raise ChatError if it exits first."""
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = ""
            if log_path and Path(log_path).exists():
                tail = "\n" + "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-20:])
            raise ChatError(f"the chat server exited with status {proc.returncode} before it was ready{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise ChatError(f"the chat server did not answer on {url} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(
    gguf_path: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    system_prompt: str | None = None,
    title: str | None = None,
    headless: bool = True,
    parallel: int | None = None,
    sampling: dict | None = None,
) -> None:
    """Serve the chat app until interrupted (Ctrl-C, SIGTERM). Bad model file or busy port: ChatError at once.
    `sampling`: the run's `chat:` settings, the chat's defaults for every user."""
    env = {ENV_SAMPLING: json.dumps(sampling)} if sampling else None
    proc = start_server(gguf_path, host, port, system_prompt, title, headless, env=env, parallel=parallel)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Killed politely, take the server down too rather than leave it holding the port.
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                previous[sig] = signal.signal(sig, _raise_interrupt)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        return
    finally:
        stop_server(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if rc not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise ChatError(f"the chat server exited with status {rc} (its messages are above)")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt

