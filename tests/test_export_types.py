"""A run exports several GGUF types: the writer's and llama.cpp's, each verified, each with an Ollama Modelfile,
each only when it is not up to date; the chat and `tunebook eval` pick among them; report.md tables them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ollama_support import parse_modelfile

from runner.export.to_gguf import export_types
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from runner.run_dir import RunDir
from train_support import ROOT, two_stage_recipe

pytestmark = pytest.mark.slow  # trains a tiny run, then runs the pipeline again

SYSTEM = "You are a careful assistant for pet owners."


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny two-stage run whose recipe exports q8_0, with a system prompt in its last stage."""
    folder = tmp_path_factory.mktemp("types")
    path = two_stage_recipe(folder, name="multi")
    text = path.read_text().replace("data: {source: vet.jsonl, format: messages, val_size: 8}",
                                    f"data: {{source: vet.jsonl, format: messages, val_size: 8, system_prompt: {SYSTEM}}}")
    path.write_text(text + "export: {quantization: q8_0}\n")
    logs: list[str] = []
    train_recipe(load_recipe(path), log=logs.append)
    return path, RunDir.of(load_recipe(path)), logs


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_the_trained_run_serves_its_first_type_with_a_modelfile(run):
    _, run_dir, logs = run
    gguf = run_dir.gguf("multi", "q8_0")
    assert gguf.is_file() and run_dir.find_gguf() == gguf
    assert any(m.startswith("verified: q8_0") for m in logs)
    commands = parse_modelfile(run_dir.modelfile("multi", "q8_0").read_text())
    found = dict(commands)
    assert found["model"] == "./multi-q8_0.gguf" and found["system"] == SYSTEM
    assert "<|start_header_id|>{{ .Role }}" in found["template"]  # the llama-3 template's twin
    assert ("stop", "<|eot_id|>") in commands


def test_adding_types_exports_only_those_and_each_is_verified(run):
    _, run_dir, _ = run
    q8 = run_dir.gguf("multi", "q8_0")
    before = q8.stat().st_mtime_ns
    logs: list[str] = []
    out = export_types(run_dir.path, ["q8_0", "q4_k_m", "bf16"], log=logs.append)
    assert list(out) == ["q8_0", "q4_k_m", "bf16"] and all(p.is_file() for p in out.values())
    assert q8.stat().st_mtime_ns == before and f"export is up to date: {q8}" in logs
    assert any(m.startswith("verified: q4_k_m") for m in logs) and any(m.startswith("verified: bf16") for m in logs)
    assert any("llama.cpp quantizes" in m for m in logs)
    assert not list(run_dir.path.glob(".*quantize-source"))  # the full-precision source is gone
    for quant in out:
        assert dict(parse_modelfile(run_dir.modelfile("multi", quant).read_text()))["model"] == f"./multi-{quant}.gguf"
    logs.clear()
    export_types(run_dir.path, ["q4_k_m"], log=logs.append)
    assert logs == [m for m in logs if "up to date" in m or "Modelfile" in m]  # nothing made again


def test_chat_and_eval_pick_among_the_gguf_files(run):
    _, run_dir, _ = run
    export_types(run_dir.path, ["q4_k_m"], log=lambda m: None)
    assert run_dir.find_gguf("q4_k_m") == run_dir.gguf("multi", "q4_k_m")
    assert run_dir.find_gguf() == run_dir.gguf("multi", "q8_0")  # the recipe's first type stays the default
    res = cli("eval", str(run_dir.path), "--quant", "q4_k_m", "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["kind"] == "gguf" and result["target"].endswith("multi-q4_k_m.gguf") and result["tokens"] > 0
    res = cli("eval", str(run_dir.path), "--quant", "q3_k_m")
    assert res.returncode == 2 and "no q3_k_m .gguf file" in res.stderr and "Traceback" not in res.stderr
    res = cli("chat", str(run_dir.path), "--quant", "iq4_xs", "--port", "1")
    assert res.returncode == 2 and "tunebook export" in res.stderr and "Traceback" not in res.stderr


def test_adding_a_type_to_the_recipe_of_a_finished_run(run):
    path, run_dir, _ = run
    recipe = load_recipe(path, ["export.quantization=[q8_0, q5_k_m]"])
    logs: list[str] = []
    outcomes = train_recipe(recipe, log=logs.append)
    assert all(o.done for o in outcomes)
    assert not any(m.startswith("stage ") and "done in" in m for m in logs)  # no stage trained again
    assert any(m.startswith("verified: q5_k_m") for m in logs) and not any(m.startswith("verified: q8_0") for m in logs)
    assert "quality checks are up to date (quality.json)" in logs
    quality = json.loads(run_dir.quality_of("q5_k_m").read_text())
    assert quality["gguf"] == "multi-q5_k_m.gguf" and quality["type"] == "q5_k_m"
    report = run_dir.report.read_text()
    assert "## Exported GGUF files" in report
    assert "| q8_0 | multi-q8_0.gguf |" in report and "| q5_k_m | multi-q5_k_m.gguf |" in report
    assert run_dir.served_quant() == "q8_0"


def test_export_errors_are_clear(run):
    path, run_dir, _ = run
    res = cli("export", str(run_dir.path), "--quant", "q8_0,q4_km")
    assert res.returncode == 2 and "unknown quantization" in res.stderr and "Traceback" not in res.stderr
    res = cli("validate", str(path), "--set", "export.quantization=[q4_k_m, q4_k_m]")
    assert res.returncode == 2 and "listed twice" in res.stderr
