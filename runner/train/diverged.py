"""A stage whose loss or validation loss is NaN or infinite is not done: every backend checks its metrics with
`first_non_finite` and, on a hit, saves the stage as failed (stage.json stays strict JSON, no adapter) and
raises `Diverged`, which says where it happened and what to try. No later stage starts from a failed one."""
from __future__ import annotations

import math
from typing import Iterable

from ..errors import TunebookError
from ..launch import is_main_process
from ..run_dir import StageDir, StageOutcome

WATCHED = ("loss", "eval_loss", "eval_ppl")


class Diverged(TunebookError):
    """A stage's metrics are not finite numbers."""


def _non_finite(value) -> bool:
    if isinstance(value, str):  # printed logs carry numbers as text ('nan', 'inf')
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and not math.isfinite(value)


def first_non_finite(rows: Iterable[dict]) -> tuple[int, str, float] | None:
    """(step, metric, value) of the first row whose loss, eval_loss or eval_ppl is NaN or infinite."""
    for row in rows:
        for key in WATCHED:
            if _non_finite(row.get(key)):
                return int(row.get("step") or 0), key, float(row[key])
    return None


def fail_stage(stage_dir: StageDir, lineage: list[str], backend: str, step: int, metric: str, value: float,
               dtype: str | None = None) -> Diverged:
    """Save the stage as failed (main process) and return the error to raise."""
    stage, where = stage_dir.name, stage_dir.path
    when = "in the evaluation before the first training step" if step == 0 else f"at step {step}"
    what = f"stage {stage}: {metric} is {value} {when} (backend {backend}" + (f", {dtype}" if dtype else "") + ")"
    if step <= 1:
        hint = ("from the start: the model's numbers overflow in its dtype (float16 on a CPU, or a model that needs "
                "bfloat16 or float32): set model.dtype: bfloat16 or float32 (and train.bf16 to match)")
    else:
        hint = ("training diverged: lower train.learning_rate (and train.trainable_tokens_lr), keep "
                "train.max_grad_norm set, or use more warmup_steps")
    if is_main_process():
        stage_dir.save_outcome(StageOutcome(stage, "failed", None, list(lineage), step, error=what))
    return Diverged(f"{what}; the stage is not done and no later stage starts from it\n"
                    f"    fix: {hint}; then delete {where} (its checkpoints hold these weights) or run under a new "
                    "name (--set name=...)")
