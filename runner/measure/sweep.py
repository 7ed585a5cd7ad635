"""What `tunebook sweep` measures and writes: per variant, each stage's version (trained or reused, and how many
steps), its evaluations and the forgetting matrix, and, when the objective or a bound names one of its numbers,
the evaluation gate of the served model (questions never trained on); the variant the user's objective picks
within their bounds; the comparison (sweep.json, report.md and curves), rendered by eval/report.py."""
from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from eval.report import StageRow, forgetting_table, markdown_table, plot_curves

from .. import atomic
from ..errors import TunebookError
from ..recipe import Recipe
from ..run_dir import RunDir
from ..train.metrics import read_metrics
from .gate import MODES, REFERENCE, SERVED

METRICS = {
    "eval_ppl": "validation perplexity of the adapter the stage keeps (its last evaluation, or its best with keep: best)",
    "eval_loss": "validation loss of the adapter the stage keeps",
    "best_eval_ppl": "lowest validation perplexity over the stage's evaluations",
    "best_eval_loss": "lowest validation loss over the stage's evaluations",
    "forgetting": "relative rise of the stage's validation perplexity from after it to after the last stage",
    "steps": "optimizer steps of the stage",
    "seconds": "training seconds of the stage",
}
# The served model's evaluation gate (runner/measure/gate.py), as `gate.MODE.METRIC` (MODE: greedy or chat, the
# chat's own sampler) or `gate.reference_ppl`.
GATE = "gate"
GATE_METRICS = {
    "stop_rate": "share of answers that stop at end-of-turn",
    "referral_rate": "share of answers that send the owner to a vet, where the question calls for one",
    "warning_rate": "share of answers that warn, where the question involves something dangerous",
    "forbidden": "answers with a forbidden phrase",
    "echo": "answers repeating the system prompt",
    "loops": "answers that loop",
    "repetition_mean": "mean share of repeated 4-grams",
    "words_median": "median answer length in words",
}
GATE_NAMES = [f"{mode}.{name}" for mode in MODES for name in GATE_METRICS] + [REFERENCE]


@dataclass
class Goal:
    """`--objective stage.metric` (minimized unless `maximize`), `--max stage.metric=LIMIT` bounds (at most) and
    `--min` floors (at least). A metric is (stage, name), or ("gate", "mode.name") for the evaluation gate."""

    objective: tuple[str, str]
    maximize: bool = False
    bounds: list[tuple[str, str, float]] = field(default_factory=list)
    floors: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ".".join(self.objective)

    @property
    def needs_gate(self) -> bool:
        """Whether every variant must be exported and answer the evaluation set."""
        return any(key == GATE for key, *_ in [self.objective, *self.bounds, *self.floors])

    def limits(self) -> list[tuple[str, str, str, float]]:
        """(stage, metric, '≤' or '≥', limit) for every bound and floor."""
        return [(s, m, "≤", x) for s, m, x in self.bounds] + [(s, m, "≥", x) for s, m, x in self.floors]


def parse_goal(objective: str, bounds: list[str], maximize: bool, recipe: Recipe, floors: list[str] | None = None) -> Goal:
    """A clear error, before anything trains, for an unknown stage or metric, a bound that is not a number, or a
    gate metric the recipe cannot measure (it needs `eval:` and `export:`)."""
    stages = [s.name for s in recipe.stages]

    def metric(text: str, option: str) -> tuple[str, str]:
        stage, _, name = text.partition(".")
        if stage == GATE and stage not in stages:
            if name not in GATE_NAMES:
                raise TunebookError(f"{option} {text}: not a number of the evaluation gate\n"
                                    f"    fix: gate.MODE.METRIC with MODE greedy or chat and METRIC one of "
                                    f"{', '.join(GATE_METRICS)}, or gate.{REFERENCE} (e.g. {option} gate.chat.warning_rate)")
            if recipe.eval is None or recipe.export is None:
                raise TunebookError(f"{option} {text}: the evaluation gate needs an evaluation set and an export in the "
                                    f"recipe\n    fix: add `eval: {{data: <questions.jsonl>}}` and `export: "
                                    f"{{quantization: q8_0}}` (README, Recipes)")
            return stage, name
        if stage not in stages or name not in METRICS:
            raise TunebookError(f"{option} {text}: expected STAGE.METRIC with a stage of the recipe and a known metric\n"
                                f"    fix: stages: {', '.join(stages)}; metrics: {', '.join(METRICS)} "
                                f"(e.g. {option} {stages[-1]}.eval_ppl), or gate.MODE.METRIC for the evaluation gate")
        if name == "forgetting" and stage == stages[-1]:
            raise TunebookError(f"{option} {text}: forgetting is measured for the stages before the last one\n"
                                f"    fix: use one of {', '.join(s + '.forgetting' for s in stages[:-1]) or 'the other metrics'}")
        return stage, name

    def limits(texts: list[str], option: str) -> list[tuple[str, str, float]]:
        found = []
        for bound in texts:
            key, _, raw = bound.partition("=")
            stage, name = metric(key.strip(), option)
            try:
                limit = float(raw)
            except ValueError:
                limit = math.nan
            if not math.isfinite(limit):
                raise TunebookError(f"{option} {bound}: the limit must be a number\n"
                                    f"    fix: e.g. {option} general.forgetting=0.05")
            if name.endswith("_rate") and not 0 <= limit <= 1:
                raise TunebookError(f"{option} {bound}: a rate is a fraction from 0 to 1 (the report shows it as a "
                                    f"percentage)\n    fix: e.g. {option} {key.strip()}=0.9 for 90%")
            found.append((stage, name, limit))
        return found

    return Goal(metric(objective, "--objective"), maximize, limits(bounds, "--max"), limits(floors or [], "--min"))


def gate_numbers(run: RunDir) -> dict:
    """The served model's gate as `mode.metric` numbers (and `reference_ppl`), as the run measured it last."""
    path = run.gate_file(SERVED)
    if not path.is_file():
        return {}
    gate = json.loads(path.read_text())
    numbers = {f"{mode}.{name}": _finite(gate[mode]["summary"].get(name)) for mode in MODES if mode in gate
               for name in GATE_METRICS}
    numbers[REFERENCE] = _finite(gate.get(REFERENCE, {}).get("ppl"))
    numbers["eval_set"] = (run.made_from(path) or {}).get("eval_set")  # the set's content digest
    return numbers


def _finite(value):
    """A number, or None for one that is not (a rate over no expected answers is NaN): sweep.json stays JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def metric_value(variant: dict, stage: str, name: str):
    """A variant's number for (stage, metric) or ("gate", "mode.metric"); None when it was not measured, or is not
    a number (NaN: no question of the set expects a referral, say), so it is never chosen or within a bound."""
    if stage == GATE and stage not in variant["stages"]:
        return _finite((variant.get("gate") or {}).get(name))
    return _finite(variant["stages"].get(stage, {}).get("metrics", {}).get(name))


def _kept_eval(evals: list[dict], kept: str) -> dict | None:
    if not evals:
        return None
    return min(evals, key=lambda r: r["eval_loss"]) if kept == "best" else max(evals, key=lambda r: r["step"])


def variant_record(recipe: Recipe, run: RunDir, sets: list[str], before: list, gate: bool = False) -> dict:
    """One variant after its training: per stage its version, what this sweep did to it (`before`: the rerun
    plan made just before training it) and its metrics; the forgetting matrix; with `gate` (the variant was
    exported and measured just now), the served model's gate numbers."""
    forgetting = json.loads(run.forgetting_file.read_text()) if len(recipe.stages) > 1 and run.forgetting_file.is_file() else None
    last = recipe.stages[-1].name
    stages = {}
    for step in before:
        stage = run.stage(step.name)
        outcome = stage.outcome()
        evals = sorted((r for r in read_metrics(stage.metrics) if r.get("eval_loss") is not None), key=lambda r: r["step"])
        kept = _kept_eval(evals, outcome.kept)
        metrics = {"eval_ppl": kept and kept["eval_ppl"], "eval_loss": kept and kept["eval_loss"],
                   "best_eval_ppl": outcome.best_eval_ppl, "best_eval_loss": outcome.best_eval_loss,
                   "steps": outcome.steps, "seconds": outcome.seconds}
        if forgetting and step.name != last and step.name in forgetting["ppl"].get(step.name, {}):
            ppl = forgetting["ppl"]
            metrics["forgetting"] = (ppl[last][step.name] - ppl[step.name][step.name]) / ppl[step.name][step.name]
        stages[step.name] = {"version": stage.version, "action": step.action, "why": step.why,
                             "trained_steps": 0 if step.action == "reuse" else outcome.steps - step.steps_done,
                             "metrics": metrics, "evals": evals, "model": recipe.model.base,
                             "train": stage.fingerprint()["settings"]["train"] if stage.fingerprint() else {}}
    record = {"sets": sets, "run": str(run.path), "stages": stages, "forgetting": forgetting}
    if gate:
        record["gate"] = gate_numbers(run)
    return record


def trained_text(stage: dict) -> str:
    """What this sweep did to a stage of a variant: 'trained 24 steps', 'resumed: 12 steps', 'reused, 0 steps trained'."""
    if stage["action"] == "reuse":
        return "reused, 0 steps trained"
    return f"{'trained' if stage['action'] == 'train' else 'resumed:'} {stage['trained_steps']} steps"


def choose(variants: list[dict], goal: Goal) -> int | None:
    """The index of the best variant within the bounds, None when no variant meets them."""
    fits = [i for i, v in enumerate(variants) if metric_value(v, *goal.objective) is not None and within(v, goal)]
    if not fits:
        return None
    pick = max if goal.maximize else min
    return pick(fits, key=lambda i: metric_value(variants[i], *goal.objective))


def tied_with(variants: list[dict], goal: Goal, chosen: int) -> list[int]:
    """The other variants within the bounds whose objective equals the chosen one's (rates over the same few
    dozen questions tie often)."""
    best = metric_value(variants[chosen], *goal.objective)
    return [i for i, v in enumerate(variants) if i != chosen and within(v, goal)
            and metric_value(v, *goal.objective) == best]


def within(variant: dict, goal: Goal) -> bool:
    """The variant meets every bound and floor (a number it lacks meets none)."""
    def ok(value, op: str, limit: float) -> bool:
        return value is not None and (value <= limit if op == "≤" else value >= limit)

    return all(ok(metric_value(variant, s, m), op, limit) for s, m, op, limit in goal.limits())


def set_options(sets: list[str]) -> str:
    """`--set K=V ...` as a shell would need it typed: a JSON or YAML value keeps its spaces and quotes."""
    return " ".join(f"--set {shlex.quote(e)}" for e in sets)


def short_value(raw: str, width: int = 40) -> str:
    """A swept value as a table cell: a data section reads `vet_qa.jsonl + replay general 0.25`, any other long
    value is cut (the variant's section below the table has it whole)."""
    if len(raw) <= width:
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = None

    def item(d: dict) -> str:
        name = f"replay {d['stage']}" if "stage" in d else Path(str(d.get("source", "?"))).name
        return name + (f" {d['weight']:g}" if isinstance(d.get("weight"), (int, float)) else "")

    if isinstance(value, dict) and ("source" in value or "stage" in value):
        return item(value)
    if isinstance(value, list) and value and all(isinstance(d, dict) and ("source" in d or "stage" in d) for d in value):
        return " + ".join(item(d) for d in value)
    return raw[:width - 1] + "…"


def shown(variant: dict, column: str) -> str:
    """A variant's number as the comparison shows it: forgetting and rates as percentages."""
    stage, name = column.split(".", 1)
    value = metric_value(variant, stage, name)
    if value is None:
        return "–"
    if name == "forgetting":
        return f"{value:+.2%}"
    if name.endswith("_rate"):
        return f"{value:.1%}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_sweep_report(recipe_path: Path, variants: list[dict], keys: list[str], goal: Goal, out: Path) -> tuple[Path, int | None]:
    """out/sweep.json, out/report.md and curves; returns the report and the chosen variant's index."""
    chosen = choose(variants, goal)
    stage_names = list(variants[0]["stages"]) if variants else []
    columns = [f"{s}.forgetting" for s in stage_names[:-1]] + [f"{s}.eval_ppl" for s in stage_names]
    for name in [goal.name] + [f"{s}.{m}" for s, m, _, _ in goal.limits()]:
        if name not in columns:
            columns.append(name)
    head = ["variant"] + keys + [f"{s} version" for s in stage_names] + columns + ["within bounds", "chosen"]
    rows = []
    for i, v in enumerate(variants):
        values = dict(expr.partition("=")[::2] for expr in v["sets"])
        rows.append([str(i + 1)] + [short_value(values.get(k, "")) for k in keys]
                    + [f"{st['version'][:8]} ({trained_text(st)})" for st in v["stages"].values()]
                    + [shown(v, c) for c in columns]
                    + ["yes" if within(v, goal) else "**no**", "**←**" if i == chosen else ""])
    bounds = ", ".join(f"{s}.{m} {op} {limit:g}" for s, m, op, limit in goal.limits())
    direction = "highest" if goal.maximize else "lowest"
    if chosen is None:
        verdict = f"No variant meets {bounds or 'the objective'}: none is chosen."
    else:
        sets = set_options(variants[chosen]["sets"])
        verdict = (f"**Chosen: variant {chosen + 1}** (`{sets}`): {goal.name} {shown(variants[chosen], goal.name)}, "
                   f"the {direction} of "
                   f"{len(variants)} variants{' within ' + bounds if bounds else ''}. To export it and check it, "
                   f"run `tunebook train {recipe_path} {sets}`: every stage is reused, then the export, the quality "
                   f"checks and the report are made.")
        tied = tied_with(variants, goal, chosen)
        if tied:
            verdict += (f" Variant{'s' if len(tied) > 1 else ''} {', '.join(str(i + 1) for i in tied)} "
                        f"{'tie' if len(tied) > 1 else 'ties'} with it on {goal.name}; the first listed is chosen: "
                        "compare their other columns, or answer more questions, before trusting the difference.")
    curves, images = _curve_rows(variants), {}
    for stage in stage_names:
        images.update(plot_curves([r for r in curves if r.stage == stage], prefix=f"{stage}-"))
    for name, png in images.items():
        atomic.write_bytes(out / name, png)
    if len({v["gate"].get("eval_set") for v in variants if v.get("gate")}) > 1:
        verdict += (" **The variants answered different evaluation sets (or versions of one): their gate numbers "
                    "do not compare.**")
    parts = [f"# Sweep of {recipe_path}", "", markdown_table(head, rows), "", verdict, "",
             "A version is a stage's fingerprint: variants that share one share its training (it was trained once). "
             "Forgetting: the rise of a stage's validation perplexity from after it to after the last stage."
             + (" gate.MODE.METRIC: the served GGUF on the recipe's evaluation set, questions never trained on "
                "(MODE greedy, or chat: the chat's own sampler at a fixed seed; report.md of the run has its answers)."
                if goal.needs_gate else ""), ""]
    for i, v in enumerate(variants):
        if v["forgetting"]:
            parts += [f"## Variant {i + 1}: forgetting matrix (validation perplexity)", "",
                      "`" + set_options(v["sets"]) + "`", "", forgetting_table(v["forgetting"]), ""]
    parts += [f"![{name.rsplit('.', 1)[0]}]({name})\n" for name in images]
    report = out / "report.md"
    atomic.write_text(out / "sweep.json", json.dumps({"recipe": str(recipe_path), "objective": goal.name,
                                                      "maximize": goal.maximize, "bounds": goal.bounds,
                                                      "floors": goal.floors,
                                                      "chosen": chosen, "variants": variants}, indent=1) + "\n")
    atomic.write_text(report, "\n".join(parts))
    return report, chosen


def _curve_rows(variants: list[dict]) -> list[StageRow]:
    """One row per stage version, labelled with the variants that share it (v1+v2+v3 for a shared stage)."""
    users: dict[tuple[str, str], list[int]] = {}
    for i, v in enumerate(variants):
        for name, st in v["stages"].items():
            users.setdefault((name, st["version"]), []).append(i + 1)
    rows = []
    for (name, version), numbers in users.items():
        st = variants[numbers[0] - 1]["stages"][name]
        t = st["train"]
        rows.append(StageRow("+".join(f"v{n}" for n in numbers), name, st["model"], 0, 0, t.get("learning_rate", 0),
                             t.get("micro_batch_size", 0), t.get("gradient_accumulation_steps", 0), "", st["evals"],
                             version=version))
    return rows
