"""What a run has to say, read from its directory once: the settings, each stage's evaluations, the forgetting
matrix, the quality checks and targets, the exported files. Trackers, the model card and the Space all speak
from this one reading, so they never disagree with report.md."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..recipe import Recipe
from ..run_dir import RunDir, StageOutcome, content_identity, file_identity
from ..train.metrics import read_metrics
from ..measure.targets import check_targets


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists become text."""
    flat: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = ", ".join(map(str, value)) if isinstance(value, list) else value
    return flat


@dataclass
class StageSummary:
    name: str
    settings: dict[str, object]    # the stage's resolved keys, flattened (init, data.*, train.*)
    outcome: StageOutcome
    metrics: list[dict]            # metrics.jsonl: one row per log or evaluation
    identity: dict                 # changes whenever the stage is trained again

    @property
    def evals(self) -> list[dict]:
        return [m for m in self.metrics if m.get("eval_loss") is not None]

    @property
    def final_eval(self) -> dict | None:
        return self.evals[-1] if self.evals else None

    def numbers(self) -> dict[str, float]:
        """The stage's results as one number each (trackers' summary values)."""
        o, final = self.outcome, self.final_eval
        values = {"steps": o.steps, "seconds": o.seconds, "best_eval_loss": o.best_eval_loss,
                  "best_eval_ppl": o.best_eval_ppl, "best_step": o.best_step,
                  "final_eval_loss": final and final["eval_loss"], "final_eval_ppl": final and final.get("eval_ppl"),
                  "tokens_seen": self.metrics[-1].get("tokens_seen") if self.metrics else None}
        return {k: float(v) for k, v in values.items() if v is not None}


@dataclass
class ExportedFile:
    path: Path
    quant: str
    bytes: int
    made_from: dict | None         # what the export recorded (quant, verification level)

    @property
    def verified(self) -> str:
        level = (self.made_from or {}).get("verified")
        return f"yes ({level})" if level else "no"


@dataclass
class RunSummary:
    recipe: Recipe
    run: RunDir
    stages: list[StageSummary]
    forgetting: dict | None
    quality: dict | None
    targets: list[tuple[str, str, bool]]
    exports: list[ExportedFile]
    modelfiles: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def finished(self) -> bool:
        """Every stage of the recipe is done."""
        return len(self.stages) == len(self.recipe.stages)

    def params(self) -> dict[str, object]:
        """The run's settings that are not a stage's: base model, LoRA, backend, seed, export."""
        data = self.recipe.model_dump(mode="json", exclude={"stages", "report_to", "targets", "output_dir"})
        return {k: v for k, v in flatten(data).items() if v is not None}

    def numbers(self) -> dict[str, float]:
        """Every run-level result as a named number: each stage's perplexities, the forgetting matrix, the
        quality checks, the targets met, the size of each exported file."""
        values: dict[str, float] = {}
        for stage in self.stages:
            values.update({f"{stage.name}/{k}": v for k, v in stage.numbers().items()})
        if self.forgetting:
            for row in self.forgetting["rows"]:
                for column in self.forgetting["stages"]:
                    values[f"forgetting/{row}/{column}/ppl"] = self.forgetting["ppl"][row][column]
                    values[f"forgetting/{row}/{column}/loss"] = self.forgetting["loss"][row][column]
        if self.quality:
            q, g = self.quality["quantization"], self.quality["generation"]
            values.update({"quality/merged_ppl": q["merged_ppl"], "quality/gguf_ppl": q["gguf_ppl"],
                           "quality/gguf_vs_merged": q["relative"], "quality/stop_rate": g["stop_rate"],
                           "quality/first_token_s_median": g["first_token_s_median"],
                           "quality/first_token_s_max": g["first_token_s_max"],
                           "quality/tokens_per_s": g["tokens_per_s"]})
        if self.targets:
            values["targets/met"] = float(sum(met for _, _, met in self.targets))
            values["targets/total"] = float(len(self.targets))
        for export in self.exports:
            values[f"export/{export.path.name}/bytes"] = float(export.bytes)
        return {k: float(v) for k, v in values.items()}

    def export_table(self) -> str:
        if not self.exports:
            return ""
        lines = ["| file | type | size | verified against the merged model |", "|---|---|---|---|"]
        lines += [f"| {e.path.name} | {e.quant} | {e.bytes / 2**20:,.1f} MiB | {e.verified} |" for e in self.exports]
        return "\n".join(lines)

    def artifacts(self) -> list[Path]:
        """The run's small files worth keeping beside its numbers: recipe, report, plots, measurements."""
        run = self.run
        files = [run.recipe_file, run.resolved_file, run.report, run.forgetting_file, run.quality_file]
        return [p for p in files + run.images() if p.is_file()]

    def identity(self) -> dict:
        """Changes whenever anything this summary says changes."""
        run = self.run
        return {"recipe": content_identity(run.recipe_file), "report": content_identity(run.report),
                "forgetting": content_identity(run.forgetting_file), "quality": content_identity(run.quality_file),
                "stages": {s.name: s.identity for s in self.stages},
                "exports": {e.path.name: file_identity(e.path) for e in self.exports}}


def read_summary(run: RunDir, recipe: Recipe | None = None) -> RunSummary:
    """The run as it stands: finished stages only (a stage still training has nothing to say yet)."""
    recipe = recipe or run.load_recipe()
    stages = []
    for stage in recipe.stages:
        folder = run.stage(stage.name)
        outcome = folder.outcome()
        if outcome is None or not outcome.done:
            continue
        settings = flatten(stage.model_dump(mode="json", exclude={"name"}))
        stages.append(StageSummary(stage.name, {k: v for k, v in settings.items() if v is not None}, outcome,
                                   read_metrics(folder.metrics),
                                   {"outcome": folder.identity(), "metrics": content_identity(folder.metrics)}))
    forgetting, quality = _read(run.forgetting_file), _read(run.quality_file)
    wall = _read(run.wall_file)
    targets = check_targets(recipe.targets, forgetting, quality, wall["wall_s"] if wall else None)
    exports = []
    for path in run.ggufs():
        made_from = run.made_from(path)
        quant = (made_from or {}).get("quant") or path.stem.rsplit("-", 1)[-1]
        exports.append(ExportedFile(path, quant, path.stat().st_size, made_from))
    return RunSummary(recipe, run, stages, forgetting, quality, targets, exports, run.modelfiles())
