"""`tunebook chat`: serve a run's exported GGUF in the Chainlit web chat, on loopback by default."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chat.engine import DEFAULT_PARALLEL

from ..errors import TunebookError
from ..run_dir import RunDir, newest_run_with_gguf


def chat(
    target: Annotated[Path | None, typer.Argument(help="Run directory or .gguf file (default: the newest run with a GGUF).",
                                                  show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=0, max=65535)] = 8000,
    quant: Annotated[str | None, typer.Option(help="Which of the run's GGUFs (q8_0, q4_k_m, ...; default: the "
                                              "recipe's first export type).")] = None,
    parallel: Annotated[int, typer.Option(min=1, help="Conversations decoded together; more wait in line.")] = DEFAULT_PARALLEL,
) -> None:
    """Start the web chat on the exported GGUF (CPU, llama-cpp-python), with the run's system prompt."""
    from rich.console import Console

    from chat.engine import ChatError, check_gguf
    from chat.serve import check_port, serve

    target = Path(target).expanduser() if target is not None else newest_run_with_gguf().path
    if not target.exists():
        raise TunebookError(f"no such run directory or GGUF file: {target}")
    run = RunDir(target if target.is_dir() else target.parent)
    try:
        if quant and target.is_file():
            raise TunebookError(f"--quant {quant} picks among a run's GGUFs, but {target} is one file\n"
                                f"    fix: pass the run directory ({target.parent}) with --quant, or the file alone")
        gguf = check_gguf(target if target.is_file() else run.find_gguf(quant))
        check_port(host, port)  # a busy port or a wrong host is said before "serving"
        Console(stderr=True).print(f"serving {gguf} on http://{host}:{port} (Ctrl-C stops)", highlight=False)
        serve(gguf, host=host, port=port, system_prompt=run.system_prompt(), parallel=parallel,
              sampling=run.chat_sampling())
    except ChatError as exc:
        raise TunebookError(str(exc)) from None
