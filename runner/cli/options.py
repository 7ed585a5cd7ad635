"""What several commands share: the recipe argument, `--set`, and the consoles they print to."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True, soft_wrap=True)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, typed by the schema: --set stages.0.train.learning_rate=1e-4",
                 show_default=False),
]


def writable(path: Path, option: str, folder: bool) -> Path:
    """`path` as an --out/--data-dir value: a folder (`folder`) or a file that can be made there, checked before
    any work, so a long command does not fail at its end on a path that names the wrong thing."""
    from ..errors import TunebookError

    kind, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        raise TunebookError(f"{option} {path}: that is a {other}, not a {kind}\n"
                            f"    fix: name a {kind} (it is made if it does not exist)")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise TunebookError(f"{option} {path}: {above} is a file, so nothing can be made inside it\n"
                            f"    fix: name a {kind} under a folder")
    return path


def log_to_stderr(message: str) -> None:
    """Progress lines of long work, on stderr so stdout stays for results."""
    err.print(message, highlight=False, markup=False)
