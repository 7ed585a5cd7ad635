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


def log_to_stderr(message: str) -> None:
    """Progress lines of long work, on stderr so stdout stays for results."""
    err.print(message, highlight=False, markup=False)
