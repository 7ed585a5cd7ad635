"""report.md of a run, and the comparison of several runs: read from the run directories, rendered by
eval/report.py. A run's report is written again exactly when something it shows changed."""
from __future__ import annotations

import json
from pathlib import Path

from eval.report import (StageRow, compare_report, gate_section, generation_section, plot_curves, quantization_section,
                         run_report, targets_table)

from .. import atomic
from ..errors import TunebookError
from ..recipe import Recipe
from ..run_dir import RunDir, content_identity
from ..train.metrics import read_metrics
from .gate import read_gate
from .targets import check_targets


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_rows(run: RunDir) -> list[StageRow]:
    """One row per stage of a run: its settings and its evaluations."""
    recipe = run.load_recipe()
    rows = []
    for stage in recipe.stages:
        metrics = read_metrics(run.stage(stage.name).metrics)
        evals = sorted((m for m in metrics if m.get("eval_loss") is not None), key=lambda m: m["step"])
        t = stage.train
        rows.append(StageRow(recipe.name, stage.name, recipe.model.base, recipe.lora.r, recipe.lora.alpha,
                             t.learning_rate, t.micro_batch_size, t.gradient_accumulation_steps, recipe.backend, evals))
    return rows


def run_time_section(recipe: Recipe, run: RunDir, wall_s: float | None, quality: dict | None,
                     gate: dict[str, dict] | None = None) -> str:
    parts = []
    for stage in recipe.stages:
        outcome = run.stage(stage.name).outcome()
        if outcome:
            parts.append(f"stage {stage.name} {outcome.seconds / 60:.1f} min ({outcome.steps} steps)")
    if quality:
        parts.append(f"quality checks {quality['seconds'] / 60:.1f} min")
    if gate:
        parts.append(f"evaluation gate {sum(g.get('seconds', 0) for g in gate.values()) / 60:.1f} min")
    text = "Training and checks: " + ", ".join(parts) + "." if parts else ""
    if wall_s is not None:
        text = (f"Wall time of the command that trained every stage: **{wall_s / 60:.1f} min** (data, model loads, "
                f"training with evaluations, forgetting matrix, merge, GGUF export and verification, checks). " + text)
    return text


def report_sections(recipe: Recipe, run: RunDir) -> dict[str, str]:
    """report.md's sections after the stage table: from forgetting.json, quality.json, wall.json, stage.json."""
    forgetting, quality, wall = _read(run.forgetting_file), _read(run.quality_file), _read(run.wall_file)
    gate = read_gate(recipe, run)
    wall_s = wall["wall_s"] if wall else None
    sections = {}
    targets = targets_table(check_targets(recipe.targets, forgetting, quality, wall_s, gate.get("served")))
    if targets:
        sections["Targets"] = targets
    run_time = run_time_section(recipe, run, wall_s, quality, gate)
    if run_time:
        sections["Run time"] = run_time
    if gate:
        sections["Evaluation gate: questions never trained on"] = gate_section(gate, Path(recipe.eval.data).name)
    if quality:
        sections["Quantization check"] = quantization_section(quality["quantization"], quality["stage"])
        sections["In-distribution sample answers"] = generation_section(quality["generation"], quality["stage"],
                                                                        quality["val_examples"])
    return sections


def report_inputs(recipe: Recipe, run: RunDir) -> dict:
    return {"recipe": content_identity(run.recipe_file),
            "stages": {s.name: content_identity(run.stage(s.name).metrics) for s in recipe.stages},
            "outcomes": {s.name: run.stage(s.name).identity() for s in recipe.stages},
            **{name: content_identity(path) for name, path in (("forgetting", run.forgetting_file),
                                                                ("quality", run.quality_file),
                                                                ("wall", run.wall_file))},
            "gate": {path.name: content_identity(path) for path in sorted(run.gate_dir.glob("*.json"))}}


def write_run_report(recipe: Recipe, run: RunDir, log=print) -> Path:
    """runs/<name>/report.md and its curves; kept when nothing it shows changed."""
    inputs = report_inputs(recipe, run)
    if run.fresh(run.report, inputs):
        log(f"report is up to date: {run.report}")
        return run.report
    with run.making(run.report, inputs):
        rows = run_rows(run)
        images = plot_curves(rows)
        for name, png in images.items():
            atomic.write_bytes(run.image(name), png)
        atomic.write_text(run.report, run_report(rows, _read(run.forgetting_file), report_sections(recipe, run),
                                                 list(images)))
    log(f"report: {run.report}")
    return run.report


def write_compare_report(runs: list[RunDir | Path], out_dir: Path) -> Path:
    """out_dir/report.md (the comparison table) and its curves, for several runs."""
    rows = []
    for run in runs:
        run = run if isinstance(run, RunDir) else RunDir(run)
        if not run.is_run():
            raise TunebookError(f"{run} is not a tunebook run directory\n"
                                "    fix: pass the folders `tunebook train` wrote (one per recipe name, under output_dir)")
        rows += run_rows(run)
    images = plot_curves(rows)
    for name, png in images.items():
        atomic.write_bytes(Path(out_dir) / name, png)
    out = Path(out_dir) / "report.md"
    atomic.write_text(out, compare_report(rows, list(images)))
    return out
