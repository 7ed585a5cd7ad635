"""Run the OpenAI-compatible API (chat/openai_api.py) on a GGUF file with uvicorn: `tunebook serve` calls `serve_api`.

Loopback by default. Bound to any other address the server is reachable from other machines, so it
refuses to start without an API key (`--api-key` or $TUNEBOOK_API_KEY); clients then send
`Authorization: Bearer KEY`, as the `openai` client does with `api_key=`.
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from chat.engine import DEFAULT_PARALLEL, ChatEngine, ChatError, chat_defaults, check_gguf
from chat.serve import check_port

ENV_API_KEY = "TUNEBOOK_API_KEY"
SHUTDOWN_GRACE_S = 10


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(host: str, api_key: str | None) -> str | None:
    """The key the server will require: the one given, else $TUNEBOOK_API_KEY; an error off loopback without one."""
    key = api_key or os.environ.get(ENV_API_KEY) or None
    if key is None and not is_loopback(host):
        raise ChatError(
            f"--host {host} makes the API reachable from other machines: give it an API key "
            f"(--api-key KEY or ${ENV_API_KEY}), or listen on 127.0.0.1"
        )
    return key


def serve_api(
    gguf_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    system_prompt: str | None = None,
    model_id: str | None = None,
    parallel: int = DEFAULT_PARALLEL,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    on_ready=None,
    sampling: dict | None = None,
) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM). Bad model, busy port or a missing key: ChatError at once.
    `sampling`: the run's `chat:` settings, the defaults of a request that does not set them."""
    import uvicorn

    from chat.openai_api import Server, create_app

    gguf_path = check_gguf(gguf_path)
    key = api_key_for(host, api_key)
    check_port(host, port)
    engine = ChatEngine(gguf_path, n_ctx=n_ctx, n_threads=n_threads, parallel=parallel)
    try:
        server = Server(engine, model_id or Path(gguf_path).stem, system_prompt, key, chat_defaults(sampling))
        # On Ctrl-C or SIGTERM, replies in flight get SHUTDOWN_GRACE_S to end, then are cut: a long reply does not
        # hold a stopping server for minutes.
        config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        if on_ready:
            on_ready(server)
        uvicorn.Server(config).run()
    finally:
        engine.close()
