"""backend: axolotl on a mixed stage: axolotl has no dataset weights and cannot replay another stage's training
split, so tunebook writes the stage's training mix itself, sample for sample what the hf backend trains; and
`tunebook export-config` says it pre-mixed it. (No axolotl run here: the files are the whole contract.)"""
from __future__ import annotations

import json

import yaml

from runner.data.prepare import prepare_stage
from runner.data.tokenize import tokenize_conversations
from runner.model.base import load_tokenizer
from runner.recipe import load_recipe
from runner.train.axolotl import axolotl_config, export_configs, write_stage_files
from train_support import chat_data, tiny_base, write_recipe


def mixed_recipe(folder):
    base = tiny_base(folder)
    chat_data(folder / "general.jsonl", 48, "cats")
    chat_data(folder / "vet.jsonl", 32, "dogs")
    chat_data(folder / "extra.jsonl", 20, "birds")
    return load_recipe(write_recipe(folder, f"""
        name: mixed
        output_dir: {folder / 'runs'}
        seed: 7
        model: {{base: {base}, chat_template: llama-3, max_seq_length: 128}}
        data: {{format: messages}}
        stages:
          - name: general
            data: {{source: general.jsonl, val_size: 8}}
            train: {{max_steps: 2}}
          - name: vet
            data:
              - {{source: vet.jsonl, val_size: 6}}
              - {{source: extra.jsonl, val_size: 4, train_on: last_assistant, weight: 0.3}}
              - {{stage: general, weight: 0.25}}
            train: {{max_steps: 2}}
        """))


def ids_of(path, tokenizer, recipe) -> list[list[int]]:
    convs = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    return [e["input_ids"] for e in tokenize_conversations(
        convs, tokenizer.chat_template, tokenizer, train_on="assistant", max_length=recipe.model.max_seq_length,
        truncation="truncate").examples]


def test_the_files_hold_the_training_mix_the_hf_backend_trains(tmp_path):
    recipe = mixed_recipe(tmp_path)
    tokenizer = load_tokenizer(recipe.model)
    stage = recipe.stage("vet")
    files = write_stage_files(recipe, stage, tmp_path / "files", tokenizer, log=lambda m: None)
    prepared = prepare_stage(recipe, stage, tokenizer, log=lambda m: None)
    assert ids_of(files.train, tokenizer, recipe) == [e["input_ids"] for e in prepared.train]  # repeats and order
    assert ids_of(files.val, tokenizer, recipe) == [e["input_ids"] for e in prepared.val]
    replayed = prepared.mix.parts[2].samples
    assert replayed > 0 and files.rows == len(prepared.train) + len(prepared.val)
    # the extra source trains its last reply only: every line carries per-turn flags saying so
    lines = [json.loads(line)["messages"] for line in files.train.read_text().splitlines()]
    flagged = [[t["training"] for t in conv if t["role"] == "assistant"] for conv in lines]
    assert files.per_turn_flags and all(f and f[-1] for f in flagged)
    cfg = axolotl_config(recipe, stage, files=files)
    assert cfg["datasets"][0]["path"] == str(files.train) and cfg["test_datasets"][0]["path"] == str(files.val)
    assert cfg["datasets"][0]["message_field_training"] == "training" and cfg["val_set_size"] == 0.0


def test_export_config_pre_mixes_a_mixed_stage_and_says_so(tmp_path):
    recipe = mixed_recipe(tmp_path)
    logs: list[str] = []
    configs = export_configs(recipe, log=logs.append)
    general, vet = yaml.safe_load(configs["general"]), yaml.safe_load(configs["vet"])
    assert general["datasets"][0]["path"] == str(tmp_path / "general.jsonl")  # one source: axolotl reads it itself
    assert vet["datasets"][0]["path"].endswith("train.jsonl") and "test_datasets" in vet
    assert "pre-mixed by tunebook" in configs["vet"] and "replay-general 0.25" in configs["vet"]
    assert any("mixes 3 items by weight" in line for line in logs)
