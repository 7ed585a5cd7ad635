"""`tunebook chat`: serve a run's exported GGUF in the Chainlit web chat, on loopback by default."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import TunebookError


def newest_run_with_gguf(root: Path = Path("runs")) -> Path:
    runs = sorted((p.parent for p in root.glob("*/*.gguf")), key=lambda p: p.stat().st_mtime, reverse=True)
    if not runs:
        raise TunebookError(f"no exported model under {root}/\n"
                            "    fix: pass a run directory or a .gguf file, or train and export first (make demo)")
    return runs[0]


def chat(
    target: Annotated[Path | None, typer.Argument(help="Run directory or .gguf file (default: the newest run with a GGUF).",
                                                  show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Start the web chat on the exported Q8_0 GGUF (CPU, llama-cpp-python), with the run's system prompt."""
    from rich.console import Console

    from chat.engine import ChatError
    from chat.serve import find_gguf, run_system_prompt, serve

    target = target or newest_run_with_gguf()
    try:
        gguf = find_gguf(target)
        Console(stderr=True).print(f"serving {gguf} on http://{host}:{port} (Ctrl-C stops)", highlight=False)
        serve(gguf, host=host, port=port, system_prompt=run_system_prompt(target))
    except ChatError as exc:
        raise TunebookError(str(exc)) from None
