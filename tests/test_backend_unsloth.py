"""backend: unsloth. Without a GPU it is refused before anything is loaded, in the main environment
(unsloth is never imported here). With `allow_cpu_fallback: true` and .venv-unsloth (`make env-unsloth`),
a two-stage tiny Llama trains through unsloth's CPU path: the wiring check of the worker in its env.

`make test` does not build .venv-unsloth (see README, Backends): the test that needs it is skipped with a
reason naming `make env-unsloth`; `pytest -ra` (the default here) lists that reason in the summary.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from runner.train import unsloth as backend
from runner.errors import TunebookError
from runner.train.metrics import read_metrics
from runner.recipe import load_recipe
from runner.run_dir import RunDir
from train_support import ROOT, two_stage_recipe, write_recipe


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(backend, "gpu_available", lambda: False)


def test_refused_without_gpu_before_anything_is_loaded(tmp_path, no_gpu):
    """The base is a package that does not exist and the data a file that does not exist: any step that
    loaded or resolved something would fail differently. The GPU refusal comes first, and leaves no run dir."""
    from runner.pipeline import train_recipe

    recipe = load_recipe(write_recipe(tmp_path, f"""
        name: u
        backend: unsloth
        output_dir: {tmp_path / 'runs'}
        model: {{base: "package:no_such_base_model_package", load_in_4bit: true}}
        stages:
          - name: one
            data: {{source: missing.jsonl, format: messages}}
            train: {{max_steps: 2}}
        """))
    with pytest.raises(TunebookError) as caught:
        train_recipe(recipe, log=lambda m: pytest.fail(f"something ran: {m}"))
    message = str(caught.value)
    assert "backend: unsloth needs a CUDA GPU" in message and "nothing was loaded" in message
    assert "allow_cpu_fallback: true" in message and "backend: hf" in message
    assert not (tmp_path / "runs").exists()
    assert "unsloth" not in sys.modules


def test_cli_refuses_with_exit_status_2(tmp_path):
    path = two_stage_recipe(tmp_path)
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(path), "--set", "backend=unsloth"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "needs a CUDA GPU" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_fallback_allowed_then_the_environment_is_required(tmp_path, no_gpu, monkeypatch):
    monkeypatch.setenv("TUNEBOOK_UNSLOTH", str(tmp_path / "none" / "python"))
    recipe = load_recipe(two_stage_recipe(tmp_path), ["backend=unsloth", "allow_cpu_fallback=true"])
    with pytest.raises(TunebookError, match="TUNEBOOK_UNSLOTH"):
        backend.BACKEND.check(recipe)


def test_what_unsloth_cannot_run_is_refused_early(tmp_path, no_gpu):
    path = two_stage_recipe(tmp_path)
    packed = load_recipe(path, ["backend=unsloth", "allow_cpu_fallback=true", "stages.1.train.packing=true"])
    with pytest.raises(TunebookError, match="stage\\(s\\) vet set train.packing"):
        backend.BACKEND.check(packed)
    dora = load_recipe(path, ["backend=unsloth", "allow_cpu_fallback=true", "lora.use_dora=true"])
    with pytest.raises(TunebookError, match="use_dora"):
        backend.BACKEND.check(dora)


def test_no_gpu_when_cuda_is_hidden(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert backend.gpu_available() is False


def test_two_stages_through_unsloth_cpu_fallback(tmp_path):
    """The worker in .venv-unsloth: FastLanguageModel + get_peft_model + SFTTrainer on the stage's tokenized
    samples; metrics rows in tunebook's format; token-weighted validation equal to tunebook's evaluator."""
    from runner.pipeline import train_recipe

    try:
        backend.unsloth_python()
    except TunebookError:
        pytest.skip("no .venv-unsloth: run `make env-unsloth` to check the unsloth worker in its environment")
    recipe = load_recipe(two_stage_recipe(tmp_path, name="us"), ["backend=unsloth", "allow_cpu_fallback=true"])
    logs: list[str] = []
    outcomes = train_recipe(recipe, log=logs.append)
    assert [(o.name, o.status, o.steps) for o in outcomes] == [("general", "done", 6), ("vet", "done", 4)]
    assert any("unsloth trains on the CPU" in m for m in logs) or backend.gpu_available()
    assert any("continuing the adapter" in m for m in logs)
    run_dir = RunDir.of(recipe).path
    matrix = json.loads((run_dir / "forgetting.json").read_text())
    for outcome, steps in zip(outcomes, (6, 4)):
        rows = read_metrics(run_dir / outcome.name / "metrics.jsonl")
        evals = [r for r in rows if "eval_loss" in r]
        assert [r["step"] for r in evals] == list(range(2, steps + 1, 2))
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
        assert all(r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
        assert matrix["loss"][outcome.name][outcome.name] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
        assert (run_dir / outcome.name / "adapter" / "adapter_model.safetensors").is_file()
        assert "generation" in (run_dir / outcome.name / "adapter" / "chat_template.jinja").read_text()
        result = json.loads((run_dir / outcome.name / "unsloth" / "result.json").read_text())
        assert result["steps"] == steps and result["peak_memory_bytes"] > 0 and result["unsloth"]
