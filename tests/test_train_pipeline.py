"""`tunebook train` end to end on a tiny Llama: two stages, evaluation rows, run directory, report."""
from __future__ import annotations

import json
import math

import pytest

from runner.train.metrics import read_metrics
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from runner.run_dir import RunDir
from train_support import two_stage_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two-stage")
    recipe = load_recipe(two_stage_recipe(folder))
    outcomes = train_recipe(recipe, log=lambda m: None)
    return recipe, RunDir.of(recipe).path, outcomes


def test_both_stages_finish_and_continue_from_each_other(trained):
    recipe, run_dir, outcomes = trained
    assert [o.name for o in outcomes] == ["general", "vet"]
    assert all(o.status == "done" for o in outcomes)
    assert outcomes[0].steps == 6 and outcomes[1].steps == 4


def test_metrics_have_eval_rows_every_eval_steps(trained):
    _, run_dir, _ = trained
    for stage, steps in (("general", 6), ("vet", 4)):
        rows = read_metrics(run_dir / stage / "metrics.jsonl")
        evals = [r for r in rows if "eval_loss" in r]
        assert [r["step"] for r in evals] == list(range(2, steps + 1, 2))
        for r in evals:
            assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
        train_rows = [r for r in rows if "loss" in r]
        assert [r["step"] for r in train_rows] == list(range(1, steps + 1))  # no duplicate, none missing
        assert all(r["tokens_seen"] > 0 and r["seconds"] >= 0 and "learning_rate" in r for r in train_rows)
        assert train_rows[-1]["tokens_seen"] > train_rows[0]["tokens_seen"]


def test_run_directory_layout(trained):
    _, run_dir, _ = trained
    resolved = (run_dir / "recipe.resolved.yaml").read_text()
    assert "provenance" in resolved and "transformers" in resolved and "git_commit" in resolved
    for stage in ("general", "vet"):
        adapter = run_dir / stage / "adapter"
        assert (adapter / "adapter_model.safetensors").is_file()
        assert (adapter / "tokenizer_config.json").is_file()
        assert "{% generation %}" in (adapter / "chat_template.jinja").read_text()
        assert any((run_dir / stage / "tensorboard").rglob("events.out.tfevents*"))
        assert json.loads((run_dir / stage / "stage.json").read_text())["status"] == "done"
        assert any((run_dir / stage / "checkpoints").glob("checkpoint-*"))


def test_forgetting_matrix_and_report(trained):
    _, run_dir, _ = trained
    matrix = json.loads((run_dir / "forgetting.json").read_text())
    assert matrix["rows"] == ["base", "general", "vet"] and matrix["stages"] == ["general", "vet"]
    ppl = matrix["ppl"]
    assert ppl["general"]["general"] < ppl["base"]["general"]  # training lowered its own val set
    assert ppl["vet"]["vet"] < ppl["general"]["vet"]
    last_general = [r for r in read_metrics(run_dir / "general" / "metrics.jsonl") if "eval_loss" in r][-1]
    assert ppl["general"]["general"] == pytest.approx(last_general["eval_ppl"], rel=1e-5)
    report = (run_dir / "report.md").read_text()
    assert "Forgetting matrix" in report and "after vet" in report


def test_rerun_skips_finished_stages(trained):
    recipe, run_dir, _ = trained
    before = (run_dir / "vet" / "metrics.jsonl").read_text()
    logs = []
    outcomes = train_recipe(recipe, log=logs.append)
    assert [o.status for o in outcomes] == ["done", "done"]
    assert (run_dir / "vet" / "metrics.jsonl").read_text() == before
    assert not any("training on" in m for m in logs)


def test_eval_of_the_run_matches_training_and_ignores_batch_size(trained):
    from runner.measure.evaluate import evaluate_target

    recipe, run_dir, _ = trained
    last_vet = [r for r in read_metrics(run_dir / "vet" / "metrics.jsonl") if "eval_loss" in r][-1]
    one = evaluate_target(run_dir, stage="vet", batch_size=1, log=lambda m: None)
    eight = evaluate_target(run_dir, stage="vet", batch_size=8, log=lambda m: None)
    assert one["loss"] == pytest.approx(eight["loss"], rel=1e-5, abs=0)
    assert one["loss"] == pytest.approx(last_vet["eval_loss"], rel=1e-5)
    assert one["ppl"] == pytest.approx(math.exp(one["loss"]), rel=1e-12)


def test_eval_cli_json_on_an_adapter_with_a_data_file(trained):
    import subprocess
    import sys

    from train_support import ROOT

    recipe, run_dir, _ = trained
    res = subprocess.run([sys.executable, "-m", "runner.cli", "eval", str(run_dir / "general" / "adapter"),
                          "--data", str(recipe.base_dir / "vet.jsonl"), "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kind"] == "adapter" and out["examples"] == 32 and out["tokens"] > 0
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]))


def test_compare_writes_the_table_and_valid_plots(trained, tmp_path):
    from PIL import Image

    from runner.measure.report import write_compare_report

    recipe, run_dir, _ = trained
    other = load_recipe(recipe.path, ["name=two-b", "stages.0.train.learning_rate=1e-3"])
    train_recipe(other, log=lambda m: None)
    report = write_compare_report([run_dir, RunDir.of(other).path], tmp_path)
    text = report.read_text()
    for run in (run_dir, RunDir.of(other).path):
        for stage in ("general", "vet"):
            evals = [r for r in read_metrics(run / stage / "metrics.jsonl") if "eval_loss" in r]
            best = min(evals, key=lambda r: r["eval_loss"])
            row = next(line for line in text.splitlines() if line.startswith(f"| {run.name} | {stage} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[9] == f"{best['eval_loss']:.4f}" and cells[10] == f"{best['eval_ppl']:.3f}"
            assert cells[11] == str(best["step"])
    assert "%" in text  # relative change between rows
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 4 + 2
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        assert png.stat().st_size > 5000
