"""Edit a recipe and rerun it, on the tiny two-stage recipe with an export: an unchanged stage is reused, the
changed one trains as a new version beside the old, every artifact made from it (forgetting matrix cells,
merged model, GGUF, quality checks, report) is made again, and nothing else; going back reuses the old version;
an edited stage interrupted by Ctrl-C resumes; `tunebook compare` shows both versions; `tunebook gc` cleans up."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from safetensors.torch import load_file

from runner.errors import Interrupted
from runner.measure.report import write_compare_report
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from runner.run_dir import RunDir
from runner.train.fingerprint import stage_fingerprints
from runner.train.metrics import read_metrics
from runner.train.rerun import plan_artifacts, plan_stages
from train_support import ROOT, chat_data, tiny_base, two_stage_recipe, write_recipe

LR_EDIT = "stages.1.train.learning_rate=1e-3"


def snapshot(run: RunDir) -> dict:
    """What an edit may or may not touch, by content."""
    return {"general": run.stage("general").version, "vet": run.stage("vet").version,
            "general_metrics": run.stage("general").metrics.read_text(),
            "forgetting": json.loads(run.forgetting_file.read_text()), "ledger": json.loads(run.ledger.read_text()),
            "gguf": run.gguf("edits", "q8_0").read_bytes(), "quality": run.quality_file.read_text(),
            "report": run.report.read_text()}


def plan(recipe, run):
    stages = plan_stages(recipe, run, stage_fingerprints(recipe))
    return {s.name: s for s in stages}, {a.label: a for a in plan_artifacts(recipe, run, stages)}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edits")
    path = two_stage_recipe(folder, name="edits")
    path.write_text(path.read_text() + "export: {quantization: q8_0}\n")
    recipe = load_recipe(path)
    train_recipe(recipe, log=lambda m: None)
    run = RunDir.of(recipe)
    return path, run, snapshot(run)


@pytest.fixture(scope="module")
def edited(first):
    path, run, before = first
    logs: list[str] = []
    train_recipe(load_recipe(path, [LR_EDIT]), log=logs.append)
    return path, run, before, snapshot(run), logs


def test_plan_says_what_an_edit_redoes_and_why(first):
    path, run, _ = first
    stages, made = plan(load_recipe(path, [LR_EDIT]), run)
    assert (stages["general"].action, stages["general"].why) == ("reuse", "unchanged")
    assert stages["vet"].action == "train" and stages["vet"].why == "stages.1.train.learning_rate: 0.005 -> 0.001"
    assert {a.action for a in made.values()} == {"remake"} and set(made) == {
        "forgetting matrix", "merged model", "GGUF (q8_0)", "quality checks", "report"}

    stages, _ = plan(load_recipe(path, ["stages.0.data.max_samples=40"]), run)
    assert [stages[s].action for s in ("general", "vet")] == ["train", "train"]
    assert stages["general"].why == "stages.0.data.max_samples: null -> 40"
    assert stages["vet"].why == "stage general retrains"

    stages, made = plan(load_recipe(path, ["stages.0.train.logging_steps=3"]), run)
    assert [stages[s].action for s in ("general", "vet")] == ["reuse", "reuse"]
    assert {k: a.action for k, a in made.items()} == {"forgetting matrix": "reuse", "merged model": "reuse",
                                                       "GGUF (q8_0)": "reuse", "quality checks": "reuse",
                                                       "report": "remake"}  # it shows the recipe

    _, made = plan(load_recipe(path, ["export.quantization=[q8_0, f16]"]), run)  # a type added: only it is made
    assert (made["GGUF (q8_0)"].action, made["GGUF (f16)"].action) == ("reuse", "make")


def test_plan_command_counts_set_overrides_as_edits(first):
    path, _, _ = first
    res = subprocess.run([sys.executable, "-m", "runner.cli", "plan", str(path), "--set", LR_EDIT], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert any("stage general" in line and "reuse (6 steps)" in line and "unchanged" in line for line in lines)
    assert any("stage vet" in line and "train" in line and "stages.1.train.learning_rate: 0.005 -> 0.001" in line
               for line in lines)
    assert any("GGUF (q8_0)" in line and "remake" in line and "stage vet trains" in line for line in lines)


def test_an_edit_retrains_only_the_changed_stage(edited):
    _, run, before, after, logs = edited
    assert after["general"] == before["general"] and after["general_metrics"] == before["general_metrics"]
    assert after["vet"] != before["vet"]
    assert not any("general step" in m or "stage general: training" in m for m in logs)
    assert any("stage vet: training on" in m for m in logs)
    assert [r["step"] for r in read_metrics(run.stage("vet").metrics) if "loss" in r] == [1, 2, 3, 4]


def test_everything_made_from_the_changed_stage_is_made_again(edited):
    _, run, before, after, _ = edited
    old, new = before["forgetting"]["ppl"], after["forgetting"]["ppl"]
    assert new["base"] == old["base"] and new["general"] == old["general"]  # cells of unchanged rows are kept
    assert new["vet"] != old["vet"]
    assert after["gguf"] != before["gguf"] and after["quality"] != before["quality"] and after["report"] != before["report"]
    for artifact in ("forgetting.json", "merged", "edits-q8_0.gguf", "quality.json", "report.md"):
        record = json.dumps(after["ledger"][artifact])
        assert after["vet"] in record and before["vet"] not in record, artifact  # made from the new version only


def test_the_old_version_is_kept_and_compare_shows_both(edited, tmp_path):
    _, run, before, after, _ = edited
    old = run.version("vet", before["vet"])
    assert old.outcome().done and (old.adapter / "adapter_model.safetensors").is_file()
    assert [v.version for v in run.versions("vet")] == [before["vet"], after["vet"]]
    assert run.stage("vet").path.resolve() == run.version("vet", after["vet"]).path.resolve()
    text = write_compare_report([run.path], tmp_path).read_text()
    vet_rows = [line for line in text.splitlines() if line.startswith("| edits | vet |")]
    assert len(vet_rows) == 2
    assert "0.005" in vet_rows[0] and "edited since: stages.1.train.learning_rate: 0.005 -> 0.001" in vet_rows[0]
    assert "0.001" in vet_rows[1] and "(current)" in vet_rows[1]
    assert (tmp_path / f"edits-vet@{before['vet'][:8]}-curves.png").is_file()


def test_a_key_left_out_of_the_fingerprint_trains_nothing(edited):
    path, run, _, after, _ = edited
    logs: list[str] = []
    train_recipe(load_recipe(path, [LR_EDIT, "stages.0.train.logging_steps=3", "stages.1.train.eval_steps=4"]),
                 log=logs.append)
    assert not any("training on" in m for m in logs)
    assert any("forgetting matrix is up to date" in m for m in logs) and any("export is up to date" in m for m in logs)
    assert run.stage("vet").version == after["vet"]


def test_going_back_reuses_the_first_version(edited):
    path, run, before, _, _ = edited
    logs: list[str] = []
    train_recipe(load_recipe(path), log=logs.append)
    assert not any("training on" in m for m in logs)
    assert run.stage("vet").version == before["vet"]
    again = snapshot(run)
    for row, cells in before["forgetting"]["ppl"].items():
        assert again["forgetting"]["ppl"][row] == pytest.approx(cells, rel=1e-6)
    assert again["gguf"] == before["gguf"]  # the same adapter merged and written again


def _interrupt_once_training(metrics, deadline: float) -> None:
    """Ctrl-C, as a user presses it, once the edited stage has logged a step."""
    while time.time() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.05)


def test_an_interrupted_edited_stage_resumes_from_its_checkpoint(edited):
    path, run, before, _, _ = edited
    sets = ["stages.1.train.learning_rate=2e-3", "stages.1.train.max_steps=12"]
    recipe = load_recipe(path, sets)
    version = run.version("vet", stage_fingerprints(recipe)["vet"].digest)
    watcher = threading.Thread(target=_interrupt_once_training, args=(version.metrics, time.time() + 300))
    watcher.start()
    try:
        with pytest.raises(Interrupted):
            train_recipe(recipe, log=lambda m: None)
    finally:
        watcher.join()
    assert list(version.checkpoints.glob("checkpoint-*")) and not version.outcome_file.exists()
    stages, _ = plan(load_recipe(path, sets), run)
    assert stages["general"].action == "reuse" and stages["vet"].action == "resume"
    logs: list[str] = []
    train_recipe(load_recipe(path, sets), log=logs.append)
    assert any(f"resuming from checkpoint-{stages['vet'].steps_done}" in m for m in logs)
    assert not any("stage general: training" in m for m in logs)
    steps = [r["step"] for r in read_metrics(version.metrics) if "loss" in r]
    assert steps == list(range(1, 13)) and version.outcome().done
    assert run.version("vet", before["vet"]).outcome().done  # the other versions are untouched


def test_gc_deletes_what_no_version_needs(edited):
    path, run, before, after, _ = edited
    abandoned = run.version("vet", "0" * 16)
    (abandoned.checkpoints / "checkpoint-1").mkdir(parents=True)
    leftover = run.path / ".report.md.a1b2c3d4"
    leftover.write_text("half")
    gguf_parts = [run.path / "two-q8_0.gguf.tmp-4242", run.path / ".two-f32.gguf.quantize-source"]
    (run.gate_dir).mkdir(exist_ok=True)
    gguf_parts.append(run.gate_dir / "base-q8_0.gguf.tmp-77")  # a killed export or quantization leaves these
    for part in gguf_parts:
        part.write_bytes(b"GGUF")
    res = subprocess.run([sys.executable, "-m", "runner.cli", "gc", str(run.path), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "would free" in res.stdout and abandoned.path.exists()
    paths = run.garbage(["general", "vet"])
    assert abandoned.path in paths and leftover in paths and all(part in paths for part in gguf_parts)
    assert run.version("general", before["general"]).checkpoints in paths  # finished: resuming needs none
    assert not any(p in paths for p in (run.version("vet", before["vet"]).path, run.version("vet", after["vet"]).path))
    run.remove(paths)
    assert not abandoned.path.exists() and not leftover.exists()
    for version in run.versions("vet"):
        assert (version.adapter / "adapter_model.safetensors").is_file() and not version.checkpoints.exists()
    current = run.stage("vet").version
    run.remove(run.garbage(["general", "vet"], old_versions=True))
    assert [v.version for v in run.versions("vet")] == [current]
    assert run.stage("vet").outcome().done and (run.stage("general").adapter / "adapter_model.safetensors").is_file()


def test_a_run_from_before_versions_is_adopted_without_training(tmp_path):
    base = tiny_base(tmp_path)
    chat_data(tmp_path / "d.jsonl", 24)
    path = write_recipe(tmp_path, f"""
        name: old
        output_dir: {tmp_path / 'runs'}
        model: {{base: {base}, chat_template: llama-3, max_seq_length: 96, dtype: float32}}
        lora: {{r: 4, alpha: 8}}
        stages:
          - name: s
            data: {{source: d.jsonl, format: messages, val_size: 4}}
            train: {{max_steps: 2, learning_rate: 5e-3, micro_batch_size: 4}}
        """)
    train_recipe(load_recipe(path), log=lambda m: None)
    run = RunDir.of(load_recipe(path))
    version = run.stage("s").version
    (run.path / "s").unlink()  # the layout before versions: a plain stage folder, stage.json relative to the run
    os.replace(run.version("s", version).path, run.path / "s")
    (run.path / "s" / "fingerprint.json").unlink()
    outcome = json.loads((run.path / "s" / "stage.json").read_text())
    (run.path / "s" / "stage.json").write_text(json.dumps({**outcome, "adapter": "s/adapter"}))
    logs: list[str] = []
    train_recipe(load_recipe(path), log=logs.append)
    assert any(f"kept as version {version}" in m for m in logs) and not any("training on" in m for m in logs)
    assert run.stage("s").version == version and (run.path / "s").is_symlink()
    assert json.loads(run.version("s", version).outcome_file.read_text())["adapter"] == f"s@{version}/adapter"


def test_keys_left_out_of_the_fingerprint_do_not_change_the_weights(tmp_path):
    """The list of what is left out is a claim: two trainings that differ only there give the same adapter."""
    base = tiny_base(tmp_path)
    chat_data(tmp_path / "d.jsonl", 24)
    path = write_recipe(tmp_path, f"""
        output_dir: {tmp_path / 'runs'}
        model: {{base: {base}, chat_template: llama-3, max_seq_length: 96, dtype: float32}}
        lora: {{r: 4, alpha: 8, dropout: 0.1}}
        stages:
          - name: s
            data: {{source: d.jsonl, format: messages, val_size: 4}}
            train: {{max_steps: 4, learning_rate: 5e-3, micro_batch_size: 2, logging_steps: 1, eval_steps: 2, save_steps: 2}}
        """)
    one = load_recipe(path, ["name=one"])
    two = load_recipe(path, ["name=two", "stages.0.train.logging_steps=3", "stages.0.train.eval_steps=3",
                             "stages.0.train.save_steps=1", "stages.0.train.eval_batch_size=3",
                             "stages.0.train.gradient_checkpointing=true"])
    assert stage_fingerprints(one)["s"] == stage_fingerprints(two)["s"]
    for recipe in (one, two):
        train_recipe(recipe, log=lambda m: None)
    a, b = (load_file(RunDir.of(r).stage("s").adapter / "adapter_model.safetensors") for r in (one, two))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
