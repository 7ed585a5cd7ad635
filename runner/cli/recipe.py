"""`tunebook validate` and `tunebook plan`: what a recipe says and what it will do, before anything runs."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.syntax import Syntax
from rich.table import Table

from ..errors import TunebookError
from .options import RecipeArg, SetOpt, err, out


def validate(recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML files.", show_default=False)],
             set_: SetOpt = None) -> None:
    """Check recipes against the schema. Exit 0 when all are valid, 2 otherwise."""
    from ..recipe import check_defaults_file, is_defaults_file, load_recipe

    failed = 0
    for path in recipes:
        try:
            if is_defaults_file(path) and not set_:
                check_defaults_file(path)
                summary = "defaults for recipes to extend"
            else:
                recipe = load_recipe(path, set_ or [])
                summary = f"{recipe.name}: {len(recipe.stages)} stage{'s' if len(recipe.stages) != 1 else ''}"
        except TunebookError as exc:
            failed += 1
            err.print(f"[red]✗[/red] {path}", highlight=False)
            err.print(str(exc), highlight=False, markup=False)
        else:
            out.print(f"[green]✓[/green] {path} ({summary})", highlight=False)
    if failed:
        raise typer.Exit(2)


def plan(recipe_path: RecipeArg, set_: SetOpt = None,
         ranks: Annotated[int | None, typer.Option(help="Ranks to plan for (default: this launch's world size).")] = None) -> None:
    """Print the resolved recipe (every default filled in); per stage, steps, batch and token budget; and what
`tunebook train` would do in the run directory: per stage reuse, resume or train, per artifact reuse or make,
and why (the keys that changed, --set overrides included)."""
    from eval.numbers import number_text

    from ..recipe import load_recipe
    from ..recipe.plan import plan as plan_stages
    from ..recipe.resolved import resolved_yaml

    recipe = load_recipe(recipe_path, set_ or [])
    out.print(f"[bold]Resolved recipe[/bold] {recipe_path}")
    out.print(Syntax(resolved_yaml(recipe), "yaml", theme="ansi_dark", background_color="default"))
    stages = plan_stages(recipe, ranks)
    table = Table(title=f"Plan: {recipe.name} ({recipe.backend} backend, base {recipe.model.base})", title_justify="left")
    table.add_column("", style="bold")
    for p in stages:
        table.add_column(f"stage {p.name}", overflow="fold")
    rows = {
        "init": [p.init for p in stages],
        "data": [p.source for p in stages],
        "optimizer steps": [str(p.optimizer_steps) if p.optimizer_steps else f"{p.num_epochs:g} epoch(s): depends on data size"
                            for p in stages],
        "effective batch": [str(p.effective_batch) for p in stages],
        "token budget": [f"≤ {p.max_tokens:,} tokens" if p.max_tokens else "depends on data size" for p in stages],
        "learning rate": [number_text(p.learning_rate) for p in stages],
        "eval every": [f"{p.eval_every} steps" if p.eval_every else "never" for p in stages],
        "save every": [f"{p.save_every} steps" if p.save_every else "at the end" for p in stages],
    }
    for label, values in rows.items():
        table.add_row(label, *values)
    lora = recipe.lora
    out.print(f"LoRA r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, targets {lora.target_modules}"
              f"{', DoRA' if lora.use_dora else ''}{', rsLoRA' if lora.use_rslora else ''}; "
              f"{'4-bit' if recipe.model.load_in_4bit else '8-bit' if recipe.model.load_in_8bit else recipe.model.dtype} base",
              highlight=False)
    out.print(table)
    out.print("effective batch = micro_batch_size × gradient_accumulation_steps × ranks; "
              "token budget = steps × effective batch × max_seq_length (an upper bound)", style="dim")
    out.print(rerun_table(recipe, ranks), highlight=False)


def rerun_table(recipe, ranks: int | None) -> Table | str:
    """Per stage and per artifact: what `tunebook train` would do in the run directory, and why."""
    from ..run_dir import RunDir
    from ..train.fingerprint import stage_fingerprints
    from ..train.rerun import plan_artifacts, plan_stages

    run = RunDir.of(recipe)
    if not run.is_run():
        return f"No run in {run} yet: `tunebook train` trains every stage, then makes what follows them."
    try:
        prints = stage_fingerprints(recipe, ranks)
    except TunebookError as exc:  # e.g. a data source that cannot be read here: train would stop on it too
        return f"Cannot compare with the run in {run}: {exc}"
    steps = plan_stages(recipe, run, prints)
    table = Table(title=f"What `tunebook train` does in {run}", title_justify="left")
    for column in ("", "action", "version", "why"):
        table.add_column(column, overflow="fold")
    for step in steps:
        done = f" ({step.steps_done} steps)" if step.action in ("reuse", "resume") else ""
        table.add_row(f"stage {step.name}", step.action + done, step.fingerprint.digest, step.why)
    for artifact in plan_artifacts(recipe, run, steps):
        table.add_row(artifact.label, artifact.action, "", artifact.why)
    return table
