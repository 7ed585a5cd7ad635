"""`tunebook train`: every stage of a recipe in order (or one), resumable, also under `accelerate launch`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import SetOpt


def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    set_: SetOpt = None,
    stage: Annotated[str | None, typer.Option(help="Train only this stage (earlier stages must be finished).")] = None,
) -> None:
    """Train the recipe's stages in order. Rerunning the same command resumes an interrupted run."""
    from rich.console import Console

    from ..launch import is_local_main_process, is_main_process
    from ..pipeline import train_recipe
    from ..recipe import load_recipe
    from ..run_dir import RunDir

    console = Console(stderr=True, soft_wrap=True)
    loaded = load_recipe(recipe, set_ or [])
    # under a launch, one console per machine: its first process speaks, the others would only repeat it
    speaks = is_local_main_process()
    outcomes = train_recipe(loaded, only_stage=stage,
                            log=lambda msg: console.print(msg, highlight=False, markup=False) if speaks else None)
    if is_main_process():
        console.print(f"[green]done[/green]: {len(outcomes)} stage(s) in {RunDir.of(loaded)}", highlight=False)
    elif speaks:
        console.print("this machine's part is done: the first machine finishes the run (forgetting matrix, "
                      "export, report)", highlight=False)
