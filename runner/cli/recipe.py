"""`tunebook validate` and `tunebook plan`: what a recipe says and what it will do, before anything runs."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.syntax import Syntax
from rich.table import Table

from ..errors import TunebookError
from .options import RecipeArg, SetOpt, err, out


SchemaOnlyOpt = Annotated[bool, typer.Option("--schema-only", help="Check the schema only: skip the preflight "
                                             "(files, templates, hub ids, output folder, disk room).")]


def checked_recipe(path: Path, set_: list[str] | None, schema_only: bool = False):
    """The validated recipe and the preflight's notes; a RecipeError lists the schema's or the preflight's
    problems, each with its file, line and fix."""
    from ..errors import RecipeError
    from ..preflight import preflight
    from ..recipe.schema import load_recipe_located

    recipe, located = load_recipe_located(path, set_ or [])
    if schema_only:
        return recipe, []
    found = preflight(recipe, located)
    if found.problems:
        raise RecipeError(found.problems)
    return recipe, found.notes


def validate(recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML files.", show_default=False)],
             set_: SetOpt = None, schema_only: SchemaOnlyOpt = False) -> None:
    """Check recipes against the schema, then what can be checked without loading a model (local files,
    chat template, hub ids when the hub answers, output folder, disk room). Exit 0 when all pass, 2 otherwise."""
    from ..recipe import check_defaults_file, is_defaults_file

    failed = 0
    for path in recipes:
        notes: list[str] = []
        try:
            if is_defaults_file(path) and not set_:
                check_defaults_file(path)
                summary = "defaults for recipes to extend"
            else:
                recipe, notes = checked_recipe(path, set_, schema_only)
                summary = f"{recipe.name}: {len(recipe.stages)} stage{'s' if len(recipe.stages) != 1 else ''}"
        except TunebookError as exc:
            failed += 1
            err.print(f"[red]✗[/red] {path}", highlight=False)
            err.print(str(exc), highlight=False, markup=False)
        else:
            out.print(f"[green]✓[/green] {path} ({summary})", highlight=False)
            for note in notes:
                out.print(f"  {note}", style="dim", highlight=False, markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(2)


def measured_mixes(recipe) -> dict:
    """{stage: Mix} of every stage, tokenized (cached) here; empty when the base model or a source is on the
    hub (plan never downloads), with the reason printed."""
    from ..data.prepare import prepare_stage
    from ..data.sources import open_source
    from ..model.base import load_tokenizer, resolve_base

    try:
        remote = [recipe.model.base] if resolve_base(recipe.model, base_dir=recipe.base_dir).kind == "hub" else []
        remote += [item.source for stage in recipe.stages for item in stage.sources()
                   if open_source(item.source, recipe.base_dir, subset=item.subset, split=item.split).kind == "hub"]
        if remote:
            out.print(f"data not measured: {', '.join(remote)} would be downloaded (`tunebook data` does it)",
                      style="dim", highlight=False)
            return {}
        tokenizer = load_tokenizer(recipe.model, base_dir=recipe.base_dir)
        return {stage.name: prepare_stage(recipe, stage, tokenizer, log=lambda m: None).mix for stage in recipe.stages}
    except TunebookError as exc:
        out.print(f"data not measured: {str(exc).splitlines()[0]}", style="dim", highlight=False)
        return {}


def plan(recipe_path: RecipeArg, set_: SetOpt = None,
         ranks: Annotated[int | None, typer.Option(help="Ranks to plan for (default: the profile's processes, else "
                                                        "this launch's world size).", min=1)] = None,
         profile: Annotated[Path | None, typer.Option(help="An accelerate launch profile (recipes/accelerate/*.yaml) "
                                                          "to check the recipe against.", show_default=False)] = None,
         data: Annotated[bool, typer.Option("--data/--no-data", help="Tokenize each stage's data (cached) and show "
                                            "samples and trained tokens per source; never downloads.")] = True,
         schema_only: SchemaOnlyOpt = False) -> None:
    """Print the resolved recipe (every default filled in) and, per stage, steps, batch, token budget and the
    data mix (samples and trained tokens per source), after the checks of `validate`; what `tunebook train` would
    do in the run directory (per stage reuse, resume or train, per artifact reuse or make, and why: the keys that
    changed, --set overrides included); with --profile, what the launch does with it and what would make it fail
    (exit 2)."""
    from eval.numbers import number_text

    from ..data.report import render_mix
    from ..recipe.plan import plan as plan_stages
    from ..recipe.profile import LaunchError, check_launch, read_profile
    from ..recipe.resolved import resolved_yaml

    recipe, notes = checked_recipe(recipe_path, set_, schema_only)
    launch = read_profile(profile) if profile else None
    ranks = ranks or (launch.num_processes if launch else None)
    out.print(f"[bold]Resolved recipe[/bold] {recipe_path}")
    out.print(Syntax(resolved_yaml(recipe), "yaml", theme="ansi_dark", background_color="default"))
    mixes = measured_mixes(recipe) if data else {}
    stages = plan_stages(recipe, ranks, {name: mix.packed_rows or mix.samples for name, mix in mixes.items()})
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
    if mixes:
        table.add_row("samples (trained tokens)", *[f"{mixes[p.name].samples:,} ({mixes[p.name].trained:,})"
                                                   for p in stages])
        table.add_row("packed rows", *[f"{mixes[p.name].packed_rows:,}" if mixes[p.name].packed_rows else "not packed"
                                       for p in stages])
    out.print(table)
    out.print("effective batch = micro_batch_size × gradient_accumulation_steps × ranks; "
              "token budget = steps × effective batch × max_seq_length (an upper bound)", style="dim")
    for stage in recipe.stages:
        if stage.name in mixes and len(mixes[stage.name].parts) > 1:
            out.print(render_mix(stage.name, mixes[stage.name]))
    for note in notes:
        out.print(note, style="dim", highlight=False, markup=False, soft_wrap=True)
    out.print(rerun_table(recipe, ranks), highlight=False)
    if launch is None:
        return
    problems, launch_notes = check_launch(recipe, launch)
    out.print(f"[bold]Launch[/bold] {launch.describe()}", highlight=False)
    for note in launch_notes:
        out.print(f"  - {note}", highlight=False)
    if problems:
        raise LaunchError(problems)


def rerun_table(recipe, ranks: int | None) -> Table | str:
    """Per stage and per artifact: what `tunebook train` would do in the run directory, and why."""
    from ..measure.gate import GATE_SET, plan_gate
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
    made = plan_artifacts(recipe, run, steps)
    for artifact in made:
        table.add_row(artifact.label, artifact.action, "", artifact.why)
    served = run.gguf(recipe.name, recipe.export.quants[0]) if recipe.export else None  # another type is not served
    served_made = any(a.path == served and a.action != "reuse" for a in made)
    planned = {step.name: (step.action, step.fingerprint.digest) for step in steps}
    for model, action, why in plan_gate(recipe, run, planned, served_made):
        label = {"served": "served GGUF", "base": "base model", GATE_SET: "evaluation set"}.get(model, f"after {model}")
        table.add_row(f"gate: {label}", action, "", why)
    return table
