"""Weights & Biases: W&B has no nested runs, so a recipe run is a W&B group (named after the recipe and the run's
id): one run per stage (job_type "stage", its metrics by step) and one for the whole run (job_type "run": the
summary numbers, the tables, the files as an artifact).

Where it goes is W&B's own setting: WANDB_PROJECT (default "tunebook"), WANDB_ENTITY, WANDB_MODE (offline
keeps everything in runs/<name>/trackers/wandb/ for `wandb sync` later)."""
from __future__ import annotations

import os
import secrets
import string

from ..errors import TunebookError
from .summary import RunSummary, StageSummary

PROJECT = "tunebook"


def _mode() -> str:
    return os.environ.get("WANDB_MODE", "online")


def _url(run) -> str | None:
    return None if _mode() in ("offline", "dryrun") else run.url  # an offline run has none (W&B warns if asked)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class WandbTracker:
    name = "wandb"

    def where(self) -> str:
        return f"W&B project {os.environ.get('WANDB_PROJECT') or PROJECT} ({_mode()})"

    def check(self) -> None:
        """Online, W&B needs a key before training starts, not after."""
        import wandb

        if _mode() in ("offline", "disabled", "dryrun"):
            return
        try:
            wandb.login(verify=False)
        except Exception as exc:  # wandb's own error when no key is configured and none can be asked for
            raise TunebookError(f"report_to: wandb: no W&B API key ({exc})\n"
                                "    fix: `wandb login`, or set WANDB_API_KEY, or WANDB_MODE=offline to keep the runs "
                                "on this machine (wandb sync sends them later)") from None

    def _init(self, summary: RunSummary, **kwargs):
        import wandb

        summary.run.trackers.mkdir(parents=True, exist_ok=True)
        return wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, dir=str(summary.run.trackers),
                          reinit="create_new", tags=["tunebook"],
                          settings=wandb.Settings(console="off", silent=True, save_code=False), **kwargs)

    def open_run(self, summary: RunSummary) -> dict:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
        # nothing is sent yet: the group exists once its first run does
        return {"id": run_id, "group": f"{summary.name}-{run_id}"}

    def log_stage(self, parent: dict, summary: RunSummary, stage: StageSummary) -> dict:
        run = self._init(summary, name=f"{summary.name}/{stage.name}", group=parent["group"], job_type="stage",
                         config={"stage": stage.name, **stage.settings})
        for row in stage.metrics:
            values = {k: v for k, v in row.items() if k not in ("step", "seconds") and _number(v)}
            run.log(values, step=int(row["step"]))
        run.summary.update({f"best/{k}": v for k, v in stage.numbers().items()})
        sent = {"id": run.id, "url": _url(run)}
        run.finish()
        return sent

    def log_summary(self, parent: dict, summary: RunSummary) -> dict:
        import wandb

        run = self._init(summary, id=parent["id"], resume="allow", name=summary.name, group=parent["group"],
                         job_type="run", config=summary.params())
        run.summary.update(summary.numbers())
        tables = {}
        if summary.forgetting:
            f = summary.forgetting
            tables["forgetting"] = wandb.Table(columns=["model"] + f["stages"],
                                               data=[[row] + [f["ppl"][row][s] for s in f["stages"]] for row in f["rows"]])
        if summary.targets:
            tables["targets"] = wandb.Table(columns=["target", "measured", "met"],
                                            data=[list(row) for row in summary.targets])
        if summary.exports:
            tables["export"] = wandb.Table(columns=["file", "type", "bytes", "verified"],
                                           data=[[e.path.name, e.quant, e.bytes, e.verified] for e in summary.exports])
        if tables:
            run.log(tables)
        artifact = wandb.Artifact(f"{summary.name}-run", type="tunebook-run",
                                  description="resolved recipe, report.md, plots and measurements of a tunebook run")
        for path in summary.artifacts():
            artifact.add_file(str(path))
        run.log_artifact(artifact)
        sent = {"id": run.id, "url": _url(run)}
        run.finish()
        return sent
