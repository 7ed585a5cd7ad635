"""stage.json keeps adapter paths relative to the run directory: a run directory moved, copied or used
from another working directory still finds its adapters (eval, export, chat, the next stage)."""
from __future__ import annotations

import json
import os
import shutil

from runner.train import StageOutcome


def _run(tmp_path, name="run"):
    run = tmp_path / name
    for stage in ("general", "vet"):
        (run / stage / "adapter").mkdir(parents=True)
    return run


def test_paths_are_stored_relative_and_found_after_a_move(tmp_path):
    run = _run(tmp_path)
    outside = tmp_path / "elsewhere" / "adapter"
    outside.mkdir(parents=True)
    StageOutcome("vet", "done", str(run / "vet" / "adapter"), [str(run / "general" / "adapter"), str(outside)],
                 steps=3).save(run / "vet")
    saved = json.loads((run / "vet" / "stage.json").read_text())
    assert saved["adapter"] == "vet/adapter" and saved["lineage"] == ["general/adapter", str(outside.resolve())]

    moved = shutil.move(str(run), str(tmp_path / "moved"))
    outcome = StageOutcome.load(tmp_path / "moved" / "vet")
    assert outcome.adapter == str(tmp_path / "moved" / "vet" / "adapter") and os.path.isdir(outcome.adapter)
    assert outcome.lineage == [str(tmp_path / "moved" / "general" / "adapter"), str(outside.resolve())]
    assert moved


def test_relative_run_dir_from_another_working_directory(tmp_path, monkeypatch):
    run = _run(tmp_path)
    monkeypatch.chdir(tmp_path)
    StageOutcome("general", "done", "run/general/adapter").save(tmp_path / "run" / "general")
    monkeypatch.chdir(tmp_path / "run")
    outcome = StageOutcome.load(tmp_path / "run" / "general")
    assert outcome.adapter == str(run.resolve() / "general" / "adapter")


def test_stage_json_written_relative_to_the_working_directory_still_loads(tmp_path, monkeypatch):
    """Files from before: paths relative to where training ran."""
    run = _run(tmp_path)
    (run / "general" / "stage.json").write_text(json.dumps(
        {"name": "general", "status": "done", "adapter": "run/general/adapter", "lineage": []}))
    monkeypatch.chdir(tmp_path)
    assert StageOutcome.load(run / "general").adapter == str((run / "general" / "adapter").resolve())


def test_an_interrupted_stage_has_no_adapter(tmp_path):
    run = _run(tmp_path)
    StageOutcome("general", "interrupted", None, [], 2).save(run / "general")
    assert StageOutcome.load(run / "general").adapter is None
