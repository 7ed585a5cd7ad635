"""`tunebook export` on a trained run: merged model folder, GGUF with the training template, verification,
and the same perplexity from the GGUF (llama.cpp) as from the merged model."""
from __future__ import annotations

import subprocess
import sys

import gguf
import pytest

from eval.perplexity import evaluate_gguf, evaluate_torch
from runner.export.to_gguf import export_run
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from runner.run_dir import RunDir
from train_support import ROOT, two_stage_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    recipe = load_recipe(two_stage_recipe(folder, name="exp"))
    train_recipe(recipe, log=lambda m: None)
    return recipe, RunDir.of(recipe).path


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    return field.contents() if field is not None else None


@pytest.mark.parametrize("quant, tolerance", [("f32", 1e-3), ("q8_0", 1e-2)])
def test_export_writes_a_verified_gguf_with_the_training_template(run, quant, tolerance):
    recipe, run_dir = run
    logs = []
    out = export_run(run_dir, quant=quant, log=logs.append)
    assert out == run_dir / f"exp-{quant}.gguf" and out.is_file()
    assert any(m.startswith("verified") for m in logs)
    merged = run_dir / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer_config.json").is_file()
    template = (run_dir / "vet" / "adapter" / "chat_template.jinja").read_text()
    reader = gguf.GGUFReader(out)
    assert _field(reader, "tokenizer.chat_template") == template
    assert _field(reader, "general.name") == "exp"

    # the GGUF scores the vet validation set like the merged model does
    from runner.data.prepare import prepare_stage
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    val = prepare_stage(recipe, recipe.stages[1], tokenizer, log=lambda m: None).val
    ref = evaluate_torch(AutoModelForCausalLM.from_pretrained(merged), val, progress=False)
    got = evaluate_gguf(out, val, progress=False)
    assert got.tokens == ref.tokens
    assert abs(got.ppl - ref.ppl) / ref.ppl < tolerance


def test_second_export_reuses_the_merged_model(run):
    _, run_dir = run
    logs = []
    export_run(run_dir, quant="q8_0", verify=False, log=logs.append)
    assert any("up to date" in m for m in logs)


def test_export_cli_errors_are_clear(tmp_path, run):
    res = subprocess.run([sys.executable, "-m", "runner.cli", "export", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "not a tunebook run directory" in res.stderr and "Traceback" not in res.stderr
    _, run_dir = run
    res = subprocess.run([sys.executable, "-m", "runner.cli", "export", str(run_dir), "--quant", "q4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown quantization" in res.stderr
