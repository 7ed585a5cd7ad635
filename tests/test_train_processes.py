"""Training as a user runs it, in real processes: two CPU ranks through `accelerate launch`, and a run killed
with SIGKILL after a checkpoint that resumes to the same result as an uninterrupted run; resumes from a
stage's last checkpoint, with `keep: best`, and past a damaged checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runner.train.metrics import read_metrics
from train_support import ROOT, chat_data, tiny_base, two_stage_recipe, write_recipe

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def one_stage(folder: Path, name: str, micro: int, steps: int, save_steps: int | None = None) -> Path:
    base = tiny_base(folder.parent)
    chat_data(folder / "d.jsonl", 40)
    save = f", save_steps: {save_steps}" if save_steps else ""
    return write_recipe(folder, f"""
        name: {name}
        output_dir: {folder / 'runs'}
        seed: 11
        model: {{base: {base}, chat_template: llama-3, max_seq_length: 96, dtype: float32}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        stages:
          - name: s
            data: {{source: d.jsonl, format: messages, val_size: 8}}
            train: {{max_steps: {steps}, learning_rate: 5e-3, micro_batch_size: {micro}, logging_steps: 1, eval_steps: {steps}{save}}}
        """)


def tunebook(*args, **kw):
    return subprocess.run([sys.executable, "-m", "runner.cli", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.slow
def test_two_cpu_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    one = one_stage(tmp_path / "one", "one", micro=4, steps=4)
    two = one_stage(tmp_path / "two", "two", micro=2, steps=4)
    res1 = tunebook("train", one)
    assert res1.returncode == 0, res1.stderr[-3000:]
    launch = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "recipes/accelerate/cpu-2proc.yaml"), "--main_process_port", "29533", "-m", "runner.cli",
         "train", str(two)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert launch.returncode == 0, launch.stderr[-3000:]
    outcome = json.loads((tmp_path / "two/runs/two/s/stage.json").read_text())
    assert outcome["world_size"] == 2
    rows1 = read_metrics(tmp_path / "one/runs/one/s/metrics.jsonl")
    rows2 = read_metrics(tmp_path / "two/runs/two/s/metrics.jsonl")
    loss1 = [r["loss"] for r in rows1 if "loss" in r]
    loss2 = [r["loss"] for r in rows2 if "loss" in r]
    assert len(loss1) == len(loss2) == 4
    # Same samples in every optimizer step. The first loss is the same number; after it, gradients summed
    # across ranks differ in float rounding, which Adam's first steps amplify a little: 0.5% tolerance.
    assert loss2[0] == pytest.approx(loss1[0], rel=1e-5)
    assert loss2 == pytest.approx(loss1, rel=5e-3)
    eval1 = [r for r in rows1 if "eval_loss" in r][-1]
    eval2 = [r for r in rows2 if "eval_loss" in r][-1]
    assert eval2["eval_loss"] == pytest.approx(eval1["eval_loss"], rel=5e-3)
    assert rows2[-1]["tokens_seen"] == rows1[-1]["tokens_seen"]  # summed over both ranks


def launch_two_ranks(recipe: Path, port: int) -> subprocess.CompletedProcess:
    """README's two-rank command: `accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml -m runner.cli train`."""
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "recipes/accelerate/cpu-2proc.yaml"), "--main_process_port", str(port), "-m", "runner.cli",
         "train", str(recipe)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_ranks_run_a_two_stage_recipe_with_export_to_the_end(tmp_path):
    """Every write has one owner process, and what runs after training (forgetting matrix, merge, GGUF, report)
    does not wait on a process that left: the launch exits 0 with every artifact made once."""
    recipe = two_stage_recipe(tmp_path, name="ranks")
    recipe.write_text(recipe.read_text() + "export: {quantization: q8_0}\n")
    done = launch_two_ranks(recipe, 29541)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    run = tmp_path / "runs" / "ranks"
    for stage in ("general", "vet"):
        outcome = json.loads((run / stage / "stage.json").read_text())
        assert outcome["status"] == "done" and outcome["world_size"] == 2
        steps = [r["step"] for r in read_metrics(run / stage / "metrics.jsonl") if "loss" in r]
        assert steps == sorted(set(steps)) and steps[-1] == outcome["steps"]  # one writer: no duplicate rows
    matrix = json.loads((run / "forgetting.json").read_text())
    assert matrix["rows"] == ["base", "general", "vet"]
    assert (run / "ranks-q8_0.gguf").stat().st_size > 0 and (run / "report.md").is_file()
    assert done.stderr.count("verified: q8_0") == 1  # exported once, by the main process
    assert "Traceback" not in done.stderr
    # one console: the second process repeats no line and does not say "done" while the first still works
    assert done.stderr.count("stage general: init fresh") == 1 and done.stderr.count("done: 2 stage(s)") == 1

    again = launch_two_ranks(recipe, 29542)  # a rerun: nothing left to do, still a clean exit
    assert again.returncode == 0, again.stderr[-3000:]
    assert "export is up to date" in again.stderr and "report is up to date" in again.stderr


def _wait_for_checkpoint(folder: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
                and (p / "optimizer.pt").is_file()]
        if done:
            return
        if proc.poll() is not None:
            raise AssertionError("training ended before a checkpoint could be interrupted")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_the_same_result(tmp_path):
    steps = 40
    plain = one_stage(tmp_path / "plain", "r", micro=2, steps=steps, save_steps=5)
    killed = one_stage(tmp_path / "killed", "r", micro=2, steps=steps, save_steps=5)
    assert tunebook("train", plain).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "train", str(killed)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(tmp_path / "killed/runs/r/s/checkpoints", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stage = tmp_path / "killed/runs/r/s"
    assert not (stage / "adapter").exists() and not (stage / "stage.json").exists()

    res = tunebook("train", killed)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from checkpoint-" in res.stderr

    a = load_file(tmp_path / "plain/runs/r/s/adapter/adapter_model.safetensors")
    b = load_file(stage / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    rows = read_metrics(stage / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == list(range(1, steps + 1))  # no duplicate, none missing
    plain_rows = read_metrics(tmp_path / "plain/runs/r/s/metrics.jsonl")
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx([r["loss"] for r in plain_rows if "loss" in r], rel=1e-4)
    assert rows[-1]["tokens_seen"] == plain_rows[-1]["tokens_seen"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # SIGTERM: a scheduler's or a preemption's notice
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig):
    recipe = one_stage(tmp_path / "int", "i", micro=2, steps=400)
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "train", str(recipe)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "int/runs/i/s/metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command again" in err and "Traceback" not in err
    checkpoints = list((tmp_path / "int/runs/i/s/checkpoints").glob("checkpoint-*"))
    assert checkpoints and all((c / "trainer_state.json").is_file() for c in checkpoints)
    step = max(int(c.name.split("-")[1]) for c in checkpoints)
    assert 0 < step < 400
    assert not (tmp_path / "int/runs/i/s/stage.json").exists()


def _stage_files(folder: Path) -> tuple[dict, dict]:
    outcome = json.loads((folder / "stage.json").read_text())
    return outcome, load_file(folder / "adapter/adapter_model.safetensors")


@pytest.mark.slow
def test_a_stage_stopped_after_its_last_checkpoint_trains_no_step_more(tmp_path):
    """Killed (or out of disk) after the checkpoint of the last step and before the adapter was written: the
    rerun writes the adapter from that checkpoint. Resuming training there took a step past max_steps, which
    changes the weights under a constant learning rate."""
    from runner.pipeline import train_recipe
    from runner.recipe import load_recipe

    recipe = one_stage(tmp_path / "r", "r", micro=2, steps=4, save_steps=2)
    sets = ["stages.0.train.lr_scheduler=constant"]
    train_recipe(load_recipe(recipe, sets), log=lambda m: None)
    stage = tmp_path / "r/runs/r/s"
    outcome, weights = _stage_files(stage)
    shutil.rmtree(stage / "adapter")
    (stage / "stage.json").unlink()
    logs = []
    train_recipe(load_recipe(recipe, sets), log=logs.append)
    assert any("checkpoint-4 is the last step; writing the adapter from it" in m for m in logs), logs
    again, weights_again = _stage_files(stage)
    assert again["steps"] == outcome["steps"] == 4
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    for key in weights:
        assert torch.equal(weights[key], weights_again[key]), key

    # an adapter cut short since (a full disk, a hand edit) is no finished stage: said, and made again
    from runner.errors import TunebookError
    from runner.run_dir import RunDir

    adapter = stage / "adapter/adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(TunebookError, match="adapter .* is missing or damaged"):
        RunDir(tmp_path / "r/runs/r").final_outcome(load_recipe(recipe, sets))
    train_recipe(load_recipe(recipe, sets), log=lambda m: None)
    for key in weights:
        assert torch.equal(weights[key], _stage_files(stage)[1][key]), key


@pytest.mark.slow
def test_keep_best_after_a_resume_keeps_the_best_of_the_whole_stage(tmp_path):
    """At a learning rate this high the stage is best early; interrupted after that step's checkpoint, the
    resumed stage must compare later evaluations with it, not with nothing."""
    from runner.pipeline import train_recipe
    from runner.recipe import load_recipe

    recipe = one_stage(tmp_path / "b", "b", micro=2, steps=6, save_steps=2)
    sets = ["stages.0.train.keep=best", "stages.0.train.learning_rate=0.05", "stages.0.train.eval_steps=1"]
    train_recipe(load_recipe(recipe, sets), log=lambda m: None)
    stage = tmp_path / "b/runs/b/s"
    outcome, weights = _stage_files(stage)
    assert outcome["best_step"] < 6  # the premise: a later evaluation is worse
    resume_from = max(s for s in (2, 4) if s >= outcome["best_step"])  # the best is at or before it
    for step in (4, 6):
        if step > resume_from:
            shutil.rmtree(stage / f"checkpoints/checkpoint-{step}", ignore_errors=True)
    shutil.rmtree(stage / "adapter")
    (stage / "stage.json").unlink()  # as a Ctrl-C after checkpoint `resume_from` leaves it
    train_recipe(load_recipe(recipe, sets), log=lambda m: None)
    again, weights_again = _stage_files(stage)
    assert (again["best_step"], again["best_eval_ppl"]) == (outcome["best_step"], pytest.approx(outcome["best_eval_ppl"]))
    for key in weights:
        assert torch.allclose(weights[key], weights_again[key], atol=1e-6), key


@pytest.mark.slow
def test_a_damaged_last_checkpoint_is_passed_over_for_the_one_before(tmp_path):
    from runner.pipeline import train_recipe
    from runner.recipe import load_recipe
    from runner.train.checkpoints import is_complete_checkpoint, last_checkpoint

    recipe = one_stage(tmp_path / "c", "c", micro=2, steps=4, save_steps=2)
    train_recipe(load_recipe(recipe), log=lambda m: None)
    checkpoints = tmp_path / "c/runs/c/s/checkpoints"
    last = checkpoints / "checkpoint-4"
    assert is_complete_checkpoint(last)
    damages = {"adapter cut short": lambda d: _truncate(d / "adapter_model.safetensors"),
               "state not JSON": lambda d: (d / "trainer_state.json").write_text("garbage"),
               "optimizer cut short": lambda d: _truncate(d / "optimizer.pt"),
               "no scheduler": lambda d: (d / "scheduler.pt").unlink()}
    for what, damage in damages.items():
        copy = checkpoints / "checkpoint-9"
        shutil.copytree(last, copy)
        damage(copy)
        assert not is_complete_checkpoint(copy), what
        assert last_checkpoint(checkpoints) == last and not copy.exists(), what  # removed, the one before used


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
