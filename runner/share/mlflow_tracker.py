"""MLflow: the recipe run is a run named after the recipe, each stage a nested run under it.

Where it goes is MLflow's own setting: MLFLOW_TRACKING_URI (a server such as http://127.0.0.1:5000, or a
local store; unset, MLflow's default) and MLFLOW_EXPERIMENT_NAME (default "tunebook"). Everything goes
through MlflowClient, so no global "active run" is left behind in the process.
"""
from __future__ import annotations

import os
import time

from ..errors import TunebookError
from .summary import RunSummary, StageSummary

EXPERIMENT = "tunebook"
BATCH = 500  # MLflow takes at most 1000 metrics and 100 params per log_batch call
PARAM_CHARS = 6000


def _experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MLflowTracker:
    name = "mlflow"

    def __init__(self):
        import mlflow
        from mlflow import MlflowClient

        self.uri = mlflow.get_tracking_uri()
        self.client = MlflowClient(self.uri)

    def where(self) -> str:
        return f"{self.uri}, experiment {_experiment_name()}"

    def check(self) -> None:
        """A tracking server must answer now, not after an hour of training."""
        if not self.uri.startswith(("http://", "https://")):
            return
        import requests

        try:
            requests.get(self.uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as exc:
            raise TunebookError(f"report_to: mlflow: the tracking server {self.uri} does not answer ({exc})\n"
                                "    fix: start it (mlflow server --host 127.0.0.1 --port 5000), point "
                                "MLFLOW_TRACKING_URI at one that runs, or remove mlflow from report_to") from None

    def _url(self, experiment_id: str, run_id: str) -> str | None:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return None

    def _log(self, run_id: str, metrics=(), params: dict | None = None, tags: dict | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        params = [Param(k, str(v)[:PARAM_CHARS]) for k, v in (params or {}).items()]
        tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for chunk in _chunks(params, 100):
            self.client.log_batch(run_id, params=chunk)
        metrics = [Metric(k, float(v), ts, step) for k, v, ts, step in metrics]
        for chunk in _chunks(metrics, BATCH):
            self.client.log_batch(run_id, metrics=chunk)
        if tags:
            self.client.log_batch(run_id, tags=tags)

    def open_run(self, summary: RunSummary) -> dict:
        name = _experiment_name()
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=summary.name,
                                     tags={"tunebook.run_dir": str(summary.run.path.resolve()),
                                           "tunebook.recipe": summary.name})
        run_id = run.info.run_id
        self._log(run_id, params=summary.params())
        return {"id": run_id, "experiment_id": experiment_id, "url": self._url(experiment_id, run_id)}

    def log_stage(self, parent: dict, summary: RunSummary, stage: StageSummary) -> dict:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run = self.client.create_run(parent["experiment_id"], run_name=stage.name,
                                     tags={MLFLOW_PARENT_RUN_ID: parent["id"], "tunebook.stage": stage.name})
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        rows = [(key, value, now, int(row["step"])) for row in stage.metrics for key, value in row.items()
                if key not in ("step", "epoch", "seconds") and isinstance(value, (int, float))]
        rows += [(f"best/{key}", value, now, 0) for key, value in stage.numbers().items()]
        self._log(run_id, rows, params=stage.settings)
        self.client.set_terminated(run_id, "FINISHED")
        return {"id": run_id, "url": self._url(parent["experiment_id"], run_id)}

    def log_summary(self, parent: dict, summary: RunSummary) -> dict:
        from eval.report import forgetting_table, targets_table

        run_id = parent["id"]
        now = int(time.time() * 1000)
        self._log(run_id, [(k, v, now, 0) for k, v in summary.numbers().items()],
                  tags={"tunebook.targets": f"{sum(m for *_, m in summary.targets)}/{len(summary.targets)} met"
                        if summary.targets else "none set"})
        tables = {"forgetting.md": summary.forgetting and forgetting_table(summary.forgetting),
                  "targets.md": targets_table(summary.targets), "export.md": summary.export_table()}
        for file, text in tables.items():
            if text:
                self.client.log_text(run_id, text + "\n", f"tables/{file}")
        for path in summary.artifacts():
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, "FINISHED")
        return {"id": run_id, "url": parent.get("url")}
