"""A mixed stage trained for real on a tiny Llama: two sources and replay of the stage before, packed together.
The batches hold the weights, every validation set gets its own column during training and in the forgetting
matrix, and `tunebook eval` scores any one of them."""
from __future__ import annotations

import json
import math

import pytest

from runner.measure.evaluate import evaluate_target
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from runner.run_dir import RunDir
from runner.train.metrics import read_metrics
from train_support import chat_data, tiny_base, write_recipe

WEIGHTS = {"vet": 0.6, "extra": 0.2, "replay-general": 0.2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    base = tiny_base(folder)
    chat_data(folder / "general.jsonl", 48, "cats")
    chat_data(folder / "vet.jsonl", 40, "dogs")
    chat_data(folder / "extra.jsonl", 30, "birds")
    path = write_recipe(folder, f"""
        name: mix
        output_dir: {folder / 'runs'}
        seed: 7
        model: {{base: {base}, chat_template: llama-3, max_seq_length: 128, dtype: float32}}
        lora: {{r: 4, alpha: 8, target_modules: all-linear}}
        data: {{format: messages}}
        stages:
          - name: general
            data: {{source: general.jsonl, val_size: 8}}
            train: {{max_steps: 2, learning_rate: 5e-3, micro_batch_size: 4, logging_steps: 1}}
          - name: vet
            data:
              - {{source: vet.jsonl, val_size: 8}}
              - {{source: extra.jsonl, val_size: 6, weight: 0.2}}
              - {{stage: general, weight: 0.2}}
            train: {{num_epochs: 1, learning_rate: 5e-3, micro_batch_size: 2, eval_steps: 2, logging_steps: 1,
                     packing: true}}
        """)
    recipe = load_recipe(path)
    train_recipe(recipe, log=lambda m: None)
    return recipe, path, RunDir.of(recipe)


def test_the_batches_hold_the_weights(trained):
    _, _, run = trained
    rows = read_metrics(run.stage("vet").metrics)
    last = [r for r in rows if r.get("mix_tokens")][-1]
    batched = last["mix_tokens"]
    assert set(batched) == set(WEIGHTS)
    assert sum(batched.values()) == max(r.get("tokens_seen", 0) for r in rows)  # every trained token counted once
    total = sum(batched.values())
    for name, weight in WEIGHTS.items():
        assert batched[name] / total == pytest.approx(weight, abs=0.02), name
    assert "## Data mix" in run.report.read_text()


def test_eval_during_training_has_one_column_per_validation_set(trained):
    _, _, run = trained
    evals = [r for r in read_metrics(run.stage("vet").metrics) if r.get("eval_loss") is not None]
    assert evals
    for row in evals:
        sets = row["eval_sets"]
        assert list(sets) == ["vet/vet", "vet/extra"]
        tokens = sum(s["tokens"] for s in sets.values())
        combined = sum(s["loss"] * s["tokens"] for s in sets.values()) / tokens
        assert row["eval_loss"] == pytest.approx(combined, rel=1e-9)
        assert all(s["ppl"] == pytest.approx(math.exp(s["loss"])) for s in sets.values())


def test_the_forgetting_matrix_has_a_column_per_validation_set(trained):
    _, _, run = trained
    matrix = json.loads(run.forgetting_file.read_text())
    assert matrix["stages"] == ["general", "vet/vet", "vet/extra"]
    assert matrix["column_stage"] == {"general": "general", "vet/vet": "vet", "vet/extra": "vet"}
    assert set(matrix["ppl"]["vet"]) == set(matrix["stages"]) and matrix["rows"] == ["base", "general", "vet"]
    assert "| model \\ val set | general | vet/vet | vet/extra |" in run.report.read_text()


def test_eval_scores_any_validation_set(trained):
    _, path, run = trained
    extra = evaluate_target(run.path, path, "vet/extra", log=lambda m: None)
    both = evaluate_target(run.path, path, "vet", log=lambda m: None)
    matrix = json.loads(run.forgetting_file.read_text())
    assert extra["examples"] == 6 and both["examples"] == 14 and "2 sets" in both["data"]
    assert extra["ppl"] == pytest.approx(matrix["ppl"]["vet"]["vet/extra"], rel=1e-4)
