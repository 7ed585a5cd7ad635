"""report.md of a run, and the comparison of runs and of stage versions: read from the run directories,
rendered by eval/report.py. A run's report is written again exactly when something it shows changed."""
from __future__ import annotations

import json
from pathlib import Path

from eval.report import (ExportRow, StageRow, compare_report, exports_table, gate_section, generation_section,
                         mix_table, plot_curves, quantization_section, run_report, targets_table)

from .. import atomic
from ..errors import TunebookError
from ..recipe import Recipe
from ..run_dir import RunDir, StageDir, content_identity, file_identity
from ..train.metrics import read_metrics
from .gate import SERVED, read_gate
from .targets import check_targets


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _last(rows: list[dict], key: str):
    return next((row[key] for row in reversed(rows) if row.get(key)), None)


def run_rows(run: RunDir, versions: bool = False) -> list[StageRow]:
    """One row per stage of a run: its settings and its evaluations; with `versions`, one row per finished
    version of each stage, oldest first, each with its own settings and what differs from the current one."""
    recipe = run.load_recipe()
    rows = []
    for stage in recipe.stages:
        t = stage.train
        current = run.stage(stage.name)
        evals = _evals(current)
        if not versions or current.version is None:
            rows.append(StageRow(recipe.name, stage.name, recipe.model.base, recipe.lora.r, recipe.lora.alpha,
                                 t.learning_rate, t.micro_batch_size, t.gradient_accumulation_steps, recipe.backend,
                                 evals, version=current.version or ""))
            continue
        now = (current.fingerprint() or {}).get("inputs") or {}
        for version in run.versions(stage.name):
            outcome, record = version.outcome(), version.fingerprint() or {}
            if outcome is None or not outcome.done or not record.get("settings"):
                continue
            rows.append(version_row(recipe.name, version, record, now, recipe.stages.index(stage),
                                    is_current=version.version == current.version))
    return rows


def version_row(run_name: str, version: StageDir, record: dict, now: dict, index: int, is_current: bool) -> StageRow:
    """A row for one stage version, from the settings it recorded when it was trained."""
    from ..train.fingerprint import PREVIOUS, what_changed

    settings, inputs = record["settings"], record.get("inputs") or {}
    t, lora = settings["train"], settings["lora"]
    changes = what_changed(inputs, now, index)
    if inputs.get(PREVIOUS) != now.get(PREVIOUS):
        changes.append("the stage it starts from")
    note = "current" if is_current else "edited since: " + ("; ".join(changes) or "nothing it records")
    return StageRow(run_name, version.name, settings["model"], lora["r"], lora["alpha"], t["learning_rate"],
                    t["micro_batch_size"], t["gradient_accumulation_steps"], settings["backend"], _evals(version),
                    version=version.version or "", note=note, current=is_current)


def _evals(stage: StageDir) -> list[dict]:
    return sorted((m for m in read_metrics(stage.metrics) if m.get("eval_loss") is not None), key=lambda m: m["step"])


def run_time_section(recipe: Recipe, run: RunDir, wall: dict | None, quality: dict | None,
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
    if wall is not None:
        trained = wall.get("trained") or [s.name for s in recipe.stages]
        reused = [s.name for s in recipe.stages if s.name not in trained]
        which = "every stage" if not reused else f"stage {', '.join(trained)} (reusing {', '.join(reused)})"
        text = (f"Wall time of the command that trained {which}: **{wall['wall_s'] / 60:.1f} min** (data, model "
                f"loads, training with evaluations, forgetting matrix, merge, GGUF export and verification, checks). "
                + text)
    return text


def made_from_current(recipe: Recipe, run: RunDir, artifact: Path) -> bool:
    """Whether an artifact was made from the version of the last stage the run uses now (a sweep variant trained
    without export leaves the checks of another version on disk)."""
    identity = run.stage(recipe.stages[-1].name).identity()
    record = run.made_from(artifact)
    return record is not None and identity is not None and identity in json.dumps(record)


def report_sections(recipe: Recipe, run: RunDir) -> dict[str, str]:
    """report.md's sections after the stage table: from forgetting.json, quality.json, wall.json, stage.json."""
    forgetting, quality, wall = _read(run.forgetting_file), _read(run.quality_file), _read(run.wall_file)
    if quality and run.stage(recipe.stages[-1].name).version and not made_from_current(recipe, run, run.quality_file):
        quality = None
    every = wall is not None and set(wall.get("trained") or [s.name for s in recipe.stages]) >= {s.name for s in recipe.stages}
    wall_s = wall["wall_s"] if wall and every else None  # the recipe's wall target is about a whole run
    gate = read_gate(recipe, run)
    sections = {}
    targets = targets_table(check_targets(recipe.targets, forgetting, quality, wall_s, gate.get("served")))
    if targets:
        sections["Targets"] = targets
    mixes = {}
    for stage in recipe.stages:
        batched = _last(read_metrics(run.stage(stage.name).metrics), "mix_tokens")
        if batched:
            mixes[stage.name] = [(item.name, item.weight, batched.get(item.name, 0)) for item in stage.data_items()]
    if mixes:
        sections["Data mix"] = mix_table(mixes) + ("\n\nWeights are shares of trained tokens; the batched shares are "
                                                   "counted from every batch the trainer took.")
    run_time = run_time_section(recipe, run, wall, quality, gate)
    if run_time:
        sections["Run time"] = run_time
    exports = export_rows(recipe, run)
    if quality and exports:
        sections["Exported GGUF files"] = (exports_table(exports, quality["stage"]) + "\n\nThe first is the one "
                                           "`tunebook chat` serves; `tunebook chat RUN --quant TYPE` serves another. "
                                           "Tokens/s: greedy generation on this machine, through the chat engine.")
    if gate:
        sections["Evaluation gate: questions never trained on"] = gate_section(gate, Path(recipe.eval.data).name)
    if quality:
        sections["Quantization check"] = quantization_section(quality["quantization"], quality["stage"])
        sections["In-distribution sample answers"] = generation_section(quality["generation"], quality["stage"],
                                                                        quality["val_examples"])
    return sections


def export_rows(recipe: Recipe, run: RunDir) -> list[ExportRow]:
    """The recipe's export types, the served one first, with their files and checks."""
    quants = recipe.export.quants if recipe.export else []
    rows = []
    for i, quant in enumerate(quants):
        gguf = run.gguf(recipe.name, quant)
        quality = _read(run.quality_of(None if i == 0 else quant))
        if quality and quality.get("gguf") != gguf.name:
            quality = None  # checks of another file (the recipe's list changed since)
        rows.append(ExportRow(quant, gguf.name, gguf.stat().st_size if gguf.is_file() else None, quality))
    return rows


def report_inputs(recipe: Recipe, run: RunDir) -> dict:
    quants = recipe.export.quants if recipe.export else []
    eval_set = recipe.local_path(recipe.eval.data) if recipe.eval else None
    exports = {q: [file_identity(run.gguf(recipe.name, q)), content_identity(run.quality_of(q))] for q in quants[1:]}
    return {"recipe": content_identity(run.recipe_file), **({"exports": exports} if exports else {}),
            "stages": {s.name: content_identity(run.stage(s.name).metrics) for s in recipe.stages},
            "outcomes": {s.name: run.stage(s.name).identity() for s in recipe.stages},
            **{name: content_identity(path) for name, path in (("forgetting", run.forgetting_file),
                                                                ("quality", run.quality_file),
                                                                ("wall", run.wall_file))},
            "gate": {path.name: content_identity(path) for path in sorted(run.gate_dir.glob("*.json"))},
            **({"eval_set": content_identity(eval_set)} if eval_set else {})}  # its labels are shown as they are now


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
    """out_dir/report.md (the comparison table) and its curves, for one or several runs: every finished version
    of every stage, so the before and after of an edit are side by side."""
    rows, gates = [], []
    for run in runs:
        run = run if isinstance(run, RunDir) else RunDir(run)
        if not run.is_run():
            raise TunebookError(f"{run} is not a tunebook run directory\n"
                                "    fix: pass the folders `tunebook train` wrote (one per recipe name, under output_dir)")
        rows += run_rows(run, versions=True)
        gates += served_gate(run)
    images = plot_curves(rows)
    for name, png in images.items():
        atomic.write_bytes(Path(out_dir) / name, png)
    out = Path(out_dir) / "report.md"
    atomic.write_text(out, compare_report(rows, list(images), gates))
    return out


def served_gate(run: RunDir) -> list[dict]:
    """The run's served model on its evaluation set, as the comparison shows it; [] when it was not measured."""
    path = run.gate_file(SERVED)
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    return [{"run": run.path.name, "result": result, "eval_set": result.get("eval_set", "?"),
             "digest": (run.made_from(path) or {}).get("eval_set")}]
