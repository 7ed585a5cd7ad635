"""`tunebook serve`: a run's exported GGUF behind an OpenAI-compatible API, on loopback by default."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chat.engine import DEFAULT_PARALLEL

from ..errors import TunebookError
from ..run_dir import RunDir, newest_run_with_gguf


def serve(
    target: Annotated[Path | None, typer.Argument(help="Run directory or .gguf file (default: the newest run with a GGUF).",
                                                  show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Any but loopback needs an API key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=0, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option(help="Key clients must send (Authorization: Bearer KEY); "
                                                     "default $TUNEBOOK_API_KEY.", show_default=False)] = None,
    quant: Annotated[str | None, typer.Option(help="Which export of the run (default: the recipe's first export type).",
                                              show_default=False)] = None,
    parallel: Annotated[int, typer.Option(min=1, help="Requests decoded together; more wait in line.")] = DEFAULT_PARALLEL,
    ctx: Annotated[int, typer.Option(min=64, help="Context window of each request, in tokens.")] = 2048,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: every core this process may use).",
                                                show_default=False)] = None,
) -> None:
    """Serve the exported GGUF as an OpenAI-compatible API (/v1/chat/completions, /v1/models), with the run's
    chat template, system prompt and stops; concurrent requests are decoded together."""
    from chat.api_server import api_key_for, serve_api
    from chat.engine import ChatError, check_gguf

    from .options import err

    target = Path(target).expanduser() if target is not None else newest_run_with_gguf().path
    if not target.exists():
        raise TunebookError(f"no such run directory or GGUF file: {target}")
    run = RunDir(target if target.is_dir() else target.parent)
    try:
        gguf = check_gguf(target if target.is_file() else run.find_gguf(quant))
        key = api_key_for(host, api_key)
        model_id = run.path.resolve().name if target.is_dir() else gguf.stem

        def ready(server):
            auth = ", API key required" if key else ""
            err.print(f"serving {gguf} as model '{model_id}' on http://{host}:{port}/v1 "
                      f"({parallel} requests at a time{auth}; Ctrl-C stops)", highlight=False, markup=False)

        serve_api(gguf, host=host, port=port, api_key=key, system_prompt=run.system_prompt(), model_id=model_id,
                  parallel=parallel, n_ctx=ctx, n_threads=threads, on_ready=ready, sampling=run.chat_sampling())
    except ChatError as exc:
        raise TunebookError(str(exc)) from None
