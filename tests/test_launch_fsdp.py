"""FSDP2 on CPUs (gloo), two processes, the tiny model: the same training as one process, adapters gathered and
written once, sharded checkpoints that resume; QLoRA too, its 4-bit weights sharded.

accelerate applies FSDP only where there are GPUs: tests/fsdp_on_cpu.py stands in for them (it makes that one
decision, then runs the real `tunebook` command under the shipped profile recipes/accelerate/fsdp.yaml, with
`--mixed_precision no` as a CPU run needs).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runner.train.metrics import read_metrics
from train_support import ROOT, launch_recipe

ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def one_process(recipe: Path, *extra: str) -> None:
    done = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(recipe), *extra], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def fsdp_two_processes(recipe: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp.yaml"),
         "--mixed_precision", "no", "--main_process_port", str(port), "-m", "fsdp_on_cpu", "train", str(recipe), *extra],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    return done


def losses(run: Path, stage: str, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(run / stage / "metrics.jsonl") if key in r]


# One process with micro batch 8 and two with 4 train on the same 8 samples per optimizer step; FSDP averages the
# two halves' gradients. Measured on this tiny model (float32): losses, evaluations and the forgetting matrix
# within 8e-8 relative of one process, adapter weights within 5e-7 (float rounding of the split sums). With a
# 4-bit base the adapter is bf16 and one process evaluates through bitsandbytes' other CPU kernel: within 2e-5
# on losses, 1e-4 on perplexities. The bounds below leave 100x and 5x room for another CPU's kernels, while a
# real training difference is far larger: doubling the learning rate moves step 2's loss by 1e-2.
TOL = 1e-5
TOL_4BIT = 5e-4


@pytest.mark.slow
def test_fsdp_two_processes_train_like_one_and_resume_from_sharded_checkpoints(tmp_path):
    one = launch_recipe(tmp_path / "one", "one", micro=8)
    two = launch_recipe(tmp_path / "two", "two", micro=4)
    one_process(one)
    done = fsdp_two_processes(two, 29561)
    run1, run2 = tmp_path / "one/runs/one", tmp_path / "two/runs/two"

    # FSDP really sharded the model: checkpoints are torch.distributed.checkpoint shards, one per process
    checkpoint = run2 / "general/checkpoints/checkpoint-6"
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp",
                                                                                           "__1_0.distcp"]
    assert (checkpoint / "optimizer_0").is_dir()
    for stage in ("general", "vet"):
        outcome = json.loads((run2 / stage / "stage.json").read_text())
        assert outcome["status"] == "done" and outcome["world_size"] == 2
        assert losses(run2, stage) == pytest.approx(losses(run1, stage), rel=TOL)
        assert losses(run2, stage, "eval_loss") == pytest.approx(losses(run1, stage, "eval_loss"), rel=TOL)
        # the adapter was gathered whole (not a shard) and holds the same weights
        a = load_file(run1 / stage / "adapter/adapter_model.safetensors")
        b = load_file(run2 / stage / "adapter/adapter_model.safetensors")
        assert a.keys() == b.keys() and any("trainable_tokens" in k for k in a)
        for key in a:
            assert a[key].shape == b[key].shape, key
            assert torch.allclose(a[key], b[key], atol=1e-5), key
    # stage general keeps its best adapter: gathered in the evaluation that found it
    assert int((run2 / "general/adapter/step").read_text()) == json.loads((run2 / "general/stage.json").read_text())["best_step"]
    # every adapter, loaded back by the single-process path, scores as one process's does
    m1 = json.loads((run1 / "forgetting.json").read_text())["ppl"]
    m2 = json.loads((run2 / "forgetting.json").read_text())["ppl"]
    for row in m1:
        assert m2[row] == pytest.approx(m1[row], rel=TOL), row
    assert "Traceback" not in done.stderr

    # a run stopped after checkpoint-4 of stage general: the rerun resumes from the sharded checkpoint
    # and ends where the uninterrupted run ended
    finished = {stage: load_file(run2 / stage / "adapter/adapter_model.safetensors") for stage in ("general", "vet")}
    reference = {stage: losses(run2, stage) for stage in ("general", "vet")}
    for path in (run2 / "general/checkpoints/checkpoint-6", run2 / "general/adapter", run2 / "general/best-adapter",
                 run2 / "vet", run2 / "forgetting.json"):
        if path.is_dir():
            shutil.rmtree(path.resolve())  # runs/<name>/vet is the link to its version's folder
        else:
            path.unlink(missing_ok=True)
    (run2 / "general/stage.json").unlink()
    again = fsdp_two_processes(two, 29562)
    assert "resuming from checkpoint-4" in again.stderr
    for stage in ("general", "vet"):
        rows = [r["step"] for r in read_metrics(run2 / stage / "metrics.jsonl") if "loss" in r]
        assert rows == sorted(set(rows))  # no duplicate step after the resume
        assert losses(run2, stage) == pytest.approx(reference[stage], rel=1e-5)
        resumed = load_file(run2 / stage / "adapter/adapter_model.safetensors")
        for key, value in finished[stage].items():
            assert torch.allclose(resumed[key], value, atol=1e-6), key


@pytest.mark.slow
def test_qlora_under_fsdp_trains_like_one_process(tmp_path):
    """A 4-bit base under FSDP: its weights are stored in the compute dtype (bnb_4bit_quant_storage) so FSDP
    shards them like any other parameter (tests/test_launch_profiles.py checks the dtype the loader gives)."""
    one = launch_recipe(tmp_path / "one", "one", micro=8, load_in_4bit=True)
    two = launch_recipe(tmp_path / "two", "two", micro=4, load_in_4bit=True)
    one_process(one, "--stage", "general")
    done = fsdp_two_processes(two, 29563, "--stage", "general")
    assert "non-floating frozen Params4bit" not in done.stderr  # accelerate's warning when it cannot shard them
    run1, run2 = tmp_path / "one/runs/one", tmp_path / "two/runs/two"
    for stage in ("general",):
        assert json.loads((run2 / stage / "stage.json").read_text())["world_size"] == 2
        assert losses(run2, stage) == pytest.approx(losses(run1, stage), rel=TOL_4BIT)
        assert losses(run2, stage, "eval_loss") == pytest.approx(losses(run1, stage, "eval_loss"), rel=TOL_4BIT)
