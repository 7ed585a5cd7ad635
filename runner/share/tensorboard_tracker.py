"""TensorBoard: the hf trainer writes each stage's own events live (runs/<name>/<stage>/tensorboard/); this
adds the run's: every stage's evaluations from metrics.jsonl (whichever backend trained it), the forgetting
matrix, the quality checks and the tables, in runs/<name>/tensorboard/. `tensorboard --logdir runs/<name>`
shows both. Nothing leaves the machine."""
from __future__ import annotations

import shutil

from .summary import RunSummary, StageSummary


class TensorBoardTracker:
    name = "tensorboard"

    def where(self) -> str:
        return "local event files"

    def check(self) -> None:
        pass

    def open_run(self, summary: RunSummary) -> dict:
        return {"id": str(summary.run.tensorboard.resolve())}

    def log_stage(self, parent: dict, summary: RunSummary, stage: StageSummary) -> dict:
        return {"id": parent["id"]}  # the stage's events are the trainer's; the summary carries its evaluations

    def log_summary(self, parent: dict, summary: RunSummary) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        from eval.report import comparison_table, forgetting_table, targets_table

        from ..measure.report import run_rows

        folder = summary.run.tensorboard
        shutil.rmtree(folder, ignore_errors=True)  # written whole each time: no stale or doubled events
        with SummaryWriter(str(folder)) as writer:
            for stage in summary.stages:
                for row in stage.metrics:
                    for key in ("loss", "eval_loss", "eval_ppl"):
                        if row.get(key) is not None:
                            writer.add_scalar(f"{stage.name}/{key}", row[key], row["step"])
            for key, value in summary.numbers().items():
                writer.add_scalar(f"run/{key}", value, 0)
            texts = {"stages": comparison_table(run_rows(summary.run)), "targets": targets_table(summary.targets),
                     "forgetting": summary.forgetting and forgetting_table(summary.forgetting),
                     "export": summary.export_table(), "recipe": "```yaml\n" + summary.run.recipe_file.read_text() + "```"}
            for tag, text in texts.items():
                if text:
                    writer.add_text(tag, text, 0)
        return {"id": parent["id"], "url": None}
