"""A stage whose loss or validation loss is NaN or infinite fails: a clear error (which stage, step, metric, what
to try), stage.json saved as failed in strict JSON with no adapter, and no later stage starts from it. Real
training of a tiny Llama whose final norm holds a NaN (what an overflowing dtype gives a trainer); the axolotl
backend's side of it is in test_backend_axolotl.py."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from runner.errors import TunebookError
from runner.run_dir import RunDir, StageDir
from runner.train.diverged import Diverged, fail_stage, first_non_finite
from runner.train.metrics import read_metrics
from train_support import ROOT, nan_base, stage_started, two_stage_recipe


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_first_non_finite_finds_step_and_metric():
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5, "eval_ppl": 4.4},
            {"step": 3, "loss": "nan"}, {"step": 4, "eval_loss": math.inf}]
    assert first_non_finite(rows[:2]) is None
    step, metric, value = first_non_finite(rows)
    assert (step, metric, math.isnan(value)) == (3, "loss", True)
    assert first_non_finite([{"step": 0, "eval_loss": 5.0, "eval_ppl": math.inf}])[:2] == (0, "eval_ppl")


def test_fail_stage_saves_strict_json_and_says_what_to_try(tmp_path):
    stage = StageDir(tmp_path / "run" / "general")
    stage.path.mkdir(parents=True)
    early = fail_stage(stage, [], "axolotl", 0, "eval_loss", math.nan, "float16")
    assert isinstance(early, TunebookError) and early.exit_code == 2
    text = str(early)
    assert "stage general: eval_loss is nan in the evaluation before the first training step (backend axolotl, " \
           "float16)" in text and "model.dtype: bfloat16 or float32" in text and str(stage.path) in text
    saved = strict_json(stage.outcome_file)
    assert saved["status"] == "failed" and saved["adapter"] is None and saved["best_eval_loss"] is None
    assert saved["error"].startswith("stage general: eval_loss is nan")
    assert not stage.outcome().done
    late = str(fail_stage(stage, [], "hf", 40, "loss", math.inf))
    assert "loss is inf at step 40 (backend hf)" in late and "lower train.learning_rate" in late


def test_a_nan_stage_fails_and_the_next_one_never_starts(tmp_path):
    from runner.pipeline import train_recipe
    from runner.recipe import load_recipe

    path = two_stage_recipe(tmp_path)
    path.write_text(path.read_text().replace(str(tmp_path / "tiny-llama"), str(nan_base(tmp_path))))
    recipe = load_recipe(path)
    with pytest.raises(Diverged, match=r"stage general: loss is nan at step 1 \(backend hf, float32\)"):
        train_recipe(recipe, log=lambda m: None)
    run = RunDir.of(recipe)
    saved = strict_json(run.stage("general").outcome_file)
    assert (saved["status"], saved["adapter"], saved["steps"]) == ("failed", None, 1)
    assert not run.stage("general").adapter.exists() and not stage_started(run.stage("vet"))
    rows = read_metrics(run.stage("general").metrics)
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] is None  # the NaN row: its loss written as null

    # from the command line: exit status 2, the error and its fix, no traceback; the stage is tried again
    res = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "loss is nan at step 1" in res.stderr and "fix:" in res.stderr and "Traceback" not in res.stderr
    assert not stage_started(run.stage("vet"))
