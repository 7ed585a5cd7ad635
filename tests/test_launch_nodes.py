"""Two machines, played on one: `accelerate launch --num_machines 2`, one process each, the first machine's address
127.0.0.1, each with its own cache (nothing shared but the output folder). The run trains as the two-process
run on one machine does, every machine makes its own cache, and the run directory is written once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.train.metrics import read_metrics
from train_support import ROOT, launch_recipe

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
PROFILE = str(ROOT / "recipes/accelerate/cpu-2proc.yaml")


def launch(recipe: Path, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", PROFILE, *extra,
         "--main_process_port", str(port), "-m", "runner.cli", "train", str(recipe)],
        cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-5000:]
    return err


def losses(run: Path, stage: str, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(run / stage / "metrics.jsonl") if key in r]


@pytest.mark.slow
def test_two_machines_train_like_one_machine_with_a_cache_each(tmp_path):
    one = launch_recipe(tmp_path / "one", "one", micro=4)
    finish(launch(one, 29571))

    two = launch_recipe(tmp_path / "two", "two", micro=4)
    machines = [launch(two, 29572, "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                       "--main_process_ip", "127.0.0.1",
                       env={**ENV, "TUNEBOOK_CACHE": str(tmp_path / f"cache-machine-{rank}")})
                for rank in (0, 1)]
    logs = [finish(proc) for proc in machines]

    run1, run2 = tmp_path / "one/runs/one", tmp_path / "two/runs/two"
    for stage in ("general", "vet"):
        assert json.loads((run2 / stage / "stage.json").read_text())["world_size"] == 2
        steps = [r["step"] for r in read_metrics(run2 / stage / "metrics.jsonl") if "loss" in r]
        assert steps == sorted(set(steps))  # one writer
        # the same two processes, the same reduction: the same numbers as on one machine
        assert losses(run2, stage) == pytest.approx(losses(run1, stage), rel=1e-6)
        assert losses(run2, stage, "eval_loss") == pytest.approx(losses(run1, stage, "eval_loss"), rel=1e-6)
    # each machine tokenized the data into its own cache: both stages, once per machine
    for rank in (0, 1):
        entries = [p for p in (tmp_path / f"cache-machine-{rank}/datasets").iterdir() if not p.name.startswith(".")]
        assert len(entries) == 2, entries
        assert logs[rank].count("tokenizing") == 2
    # what follows training ran once, on the first machine
    assert (run2 / "forgetting.json").is_file() and (run2 / "report.md").is_file()
    assert "report:" in logs[0] and "report:" not in logs[1]
