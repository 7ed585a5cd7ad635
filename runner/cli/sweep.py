"""`tunebook sweep`: a grid of recipe variants trained one after another in one run directory, so every stage
they share is trained once; then one comparison and the variant the objective picks."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import RecipeArg, SetOpt, err, log_to_stderr, out, writable


def sweep(
    recipe_path: RecipeArg,
    set_: SetOpt = None,
    objective: Annotated[str, typer.Option(help="STAGE.METRIC to minimize, e.g. vet.eval_ppl "
                                                "(metrics: eval_ppl, eval_loss, best_eval_ppl, best_eval_loss, "
                                                "forgetting, steps, seconds), or the served model's evaluation gate, "
                                                "gate.MODE.METRIC (MODE: greedy, chat; METRIC: stop_rate, referral_rate, "
                                                "warning_rate, forbidden, echo, loops, repetition_mean, words_median) "
                                                "or gate.reference_ppl.", show_default=False)] = ...,
    max_: Annotated[list[str] | None, typer.Option("--max", help="A bound METRIC=LIMIT a chosen variant must "
                                                   "not exceed, e.g. --max general.forgetting=0.05.", show_default=False)] = None,
    min_: Annotated[list[str] | None, typer.Option("--min", help="A floor METRIC=LIMIT a chosen variant must reach, "
                                                   "e.g. --min gate.greedy.stop_rate=0.9.", show_default=False)] = None,
    maximize: Annotated[bool, typer.Option("--maximize", help="Pick the highest objective instead.")] = False,
    export: Annotated[bool, typer.Option("--export", help="Also export and check every variant (slower); by default "
                                         "the chosen one is exported by the `tunebook train` command printed at the end.")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for sweep.json, report.md and the curves "
                                                 "(default: runs/<name>/sweep).", show_default=False)] = None,
) -> None:
    """Train every combination of the `--set KEY=V1,V2,...` values (a key with one value is set in all), reusing
    the stages variants share, then write the comparison (table, curves, forgetting per variant) and name the
    best variant by --objective within the --max and --min bounds. A gate metric exports every variant and has it
    answer the recipe's evaluation set (a variant that changes only `chat:` answers only with the chat's sampler
    again)."""
    from ..errors import TunebookError
    from ..measure.sweep import parse_goal, set_options, shown, tied_with, trained_text, variant_record, write_sweep_report
    from ..pipeline import train_recipe
    from ..recipe import load_recipe
    from ..recipe.grid import expand_grid, swept
    from ..run_dir import RunDir
    from ..train.fingerprint import stage_fingerprints
    from ..train.rerun import plan_stages

    variants = expand_grid(set_ or [])
    recipes = [load_recipe(recipe_path, sets) for sets in variants]  # every variant valid before anything trains
    goal = parse_goal(objective, max_ or [], maximize, recipes[0], min_ or [])
    for i, (sets, recipe) in enumerate(zip(variants[1:], recipes[1:]), 2):  # `--set stages.0.name=a,b` renames one
        try:
            parse_goal(objective, max_ or [], maximize, recipe, min_ or [])
        except TunebookError as exc:
            raise TunebookError(f"variant {i} ({' '.join(sets)}): {exc}") from None
    export = export or goal.needs_gate
    folder = writable(out_dir, "--out", folder=True) if out_dir else RunDir.of(recipes[0]).sweep_dir
    records = []
    for i, (sets, recipe) in enumerate(zip(variants, recipes)):
        err.print(f"[bold]variant {i + 1}/{len(recipes)}[/bold]: {' '.join(sets) or '(the recipe as it is)'}",
                  highlight=False)
        run = RunDir.of(recipe)
        before = plan_stages(recipe, run, stage_fingerprints(recipe))
        train_recipe(recipe, log=log_to_stderr, export=export)
        records.append(variant_record(recipe, run, sets, before, gate=export and recipe.eval is not None and recipe.export is not None))
        report, chosen = write_sweep_report(recipe_path, records, swept(set_ or []), goal, folder)
    for i, record in enumerate(records):
        done = ", ".join(f"{name} {trained_text(st)}" for name, st in record["stages"].items())
        out.print(f"variant {i + 1} ({' '.join(record['sets'])}): {done}", highlight=False, soft_wrap=True)
    if chosen is None:
        out.print(f"no variant meets the bounds; comparison: {report}", highlight=False, soft_wrap=True)
        return
    sets = set_options(records[chosen]["sets"])
    tied = tied_with(records, goal, chosen)
    tie = f", tied with variant{'s' if len(tied) > 1 else ''} {', '.join(str(i + 1) for i in tied)}" if tied else ""
    out.print(f"chosen: variant {chosen + 1} ({goal.name} {shown(records[chosen], goal.name)}{tie}); comparison: {report}\n"
              f"export it: tunebook train {recipe_path} {sets}", highlight=False, soft_wrap=True)
