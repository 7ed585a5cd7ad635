"""`report_to:` in a recipe: the run's own numbers sent to experiment trackers (TensorBoard, MLflow, W&B).

One tracker run per recipe run, with a child run per stage. A stage is sent when it finishes (its settings and
every row of its metrics.jsonl: loss, token-weighted eval loss and perplexity, learning rate, tokens seen); the
run's summary when the run is finished (each stage's perplexities, the forgetting matrix, the quality checks
and targets, the export table; the resolved recipe, report.md and the plots as artifacts). What was sent, and
where, is recorded under runs/<name>/trackers/ with runner/run_dir.py's freshness rule: a rerun sends only
what changed, into the same tracker run. No tracker is contacted unless the recipe lists it.
"""
from __future__ import annotations

import json

from .. import atomic
from ..errors import TunebookError
from ..recipe import Recipe
from ..run_dir import RunDir
from .summary import RunSummary, StageSummary, read_summary


def tracker(name: str):
    """The tracker called `name` (runner/recipe/schema.py TRACKERS)."""
    if name == "tensorboard":
        from .tensorboard_tracker import TensorBoardTracker as cls
    elif name == "mlflow":
        from .mlflow_tracker import MLflowTracker as cls
    elif name == "wandb":
        from .wandb_tracker import WandbTracker as cls
    else:
        raise TunebookError(f"report_to: unknown tracker '{name}'\n    fix: use tensorboard, mlflow or wandb")
    return cls()


def trackers(recipe: Recipe) -> list:
    return [tracker(name) for name in dict.fromkeys(recipe.report_to)]


def check_trackers(recipe: Recipe) -> None:
    """Before any training: every tracker the recipe lists can be reached (a clear error, not a lost run)."""
    for t in trackers(recipe):
        t.check()


def _parent(t, run: RunDir, summary: RunSummary) -> dict:
    """The tracker run of this recipe run: made once per destination, then reused."""
    record = run.tracker_record(t.name, "run")
    inputs = {"where": t.where()}
    if run.fresh(record, inputs):
        return json.loads(record.read_text())
    with run.making(record, inputs):
        opened = t.open_run(summary)
        atomic.write_text(record, json.dumps(opened, indent=1) + "\n")
    return opened


def _send_stage(t, run: RunDir, summary: RunSummary, parent: dict, stage: StageSummary, log) -> bool:
    record = run.tracker_record(t.name, f"stage-{stage.name}")
    inputs = {"parent": parent["id"], "stage": stage.identity}
    if run.fresh(record, inputs):
        return False
    with run.making(record, inputs):
        sent = t.log_stage(parent, summary, stage)
        atomic.write_text(record, json.dumps(sent, indent=1) + "\n")
    log(f"{t.name}: stage {stage.name} sent ({len(stage.metrics)} metric rows){_where(sent)}")
    return True


def _send_summary(t, run: RunDir, summary: RunSummary, parent: dict, log) -> bool:
    record = run.tracker_record(t.name, "summary")
    inputs = {"parent": parent["id"], "summary": summary.identity()}
    if run.fresh(record, inputs):
        return False
    with run.making(record, inputs):
        sent = t.log_summary(parent, summary)
        atomic.write_text(record, json.dumps(sent, indent=1) + "\n")
    log(f"{t.name}: run {summary.name} sent ({len(summary.numbers())} numbers, {len(summary.artifacts())} "
        f"files){_where(sent)}")
    return True


def _where(sent: dict) -> str:
    return f": {sent['url']}" if sent.get("url") else ""


def track(recipe: Recipe, run: RunDir, log=print, stage: str | None = None) -> None:
    """Send what is new to every tracker the recipe lists: one finished stage (`stage`), or everything of a
    finished run. A failure is a TunebookError that says how to send it again; nothing else is lost."""
    listed = trackers(recipe)
    if not listed:
        return
    summary = read_summary(run, recipe)
    stages = [s for s in summary.stages if stage is None or s.name == stage]
    for t in listed:
        try:
            parent = _parent(t, run, summary)
            for s in stages:
                _send_stage(t, run, summary, parent, s, log)
            if stage is None and summary.finished and not _send_summary(t, run, summary, parent, log):
                log(f"{t.name}: up to date")
        except TunebookError:
            raise
        except Exception as exc:  # the tracker's own errors (unreachable server, refused key, ...)
            raise TunebookError(f"report_to: {t.name} ({t.where()}) failed: {type(exc).__name__}: {exc}\n"
                                "    nothing is lost: the run directory holds every number; fix the tracker and "
                                "run the same `tunebook train` command again to send them") from None
