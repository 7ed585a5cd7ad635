"""`report_to:` for real: a tiny two-stage run (trained, exported, checked) sends its own numbers to an MLflow
tracking server that the test starts on loopback, read back through MLflow's client; to W&B in offline mode,
its run files read back; and to TensorBoard event files. Adding trackers to a finished run sends everything
without training again; a rerun sends nothing; an unreachable tracker fails before any training."""
from __future__ import annotations

import json

import pytest

from runner.errors import RecipeError, TunebookError
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from runner.train.metrics import read_metrics
from share_support import free_port, mlflow_server, shared_run_folder, trained_run, wandb_runs

EXPERIMENT = "tunebook-test"
# The tests marked slow share one tiny run that trains, exports and checks a model first (~1-2 min).


def _evals(run, stage):
    return [r for r in read_metrics(run / stage / "metrics.jsonl") if r.get("eval_ppl") is not None]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The finished run, then the same recipe again with report_to: [tensorboard, mlflow, wandb]."""
    run = trained_run()
    folder = tmp_path_factory.mktemp("mlflow")
    with mlflow_server(folder) as url, pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", url)
        env.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_PROJECT", "tunebook-test")
        recipe = load_recipe(shared_run_folder() / "recipe.yaml", ["report_to=[tensorboard, mlflow, wandb]"])
        from runner.run_dir import RunDir
        from runner.share.track import track

        first, again = [], []
        train_recipe(recipe, log=first.append)
        track(recipe, RunDir(run), log=again.append)  # what `tunebook train` does last, on a rerun
        yield run, url, first, again


@pytest.mark.slow
def test_mlflow_holds_one_run_with_a_child_per_stage_and_the_runs_own_numbers(tracked):
    from mlflow import MlflowClient

    run, url, first, _ = tracked
    assert not any("training on" in m for m in first)  # the trackers got what the run directory holds
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "tiny-vet")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 3 and sorted(children) == ["general", "vet"]
    assert parent.info.status == "FINISHED" and parent.data.params["lora.r"] == "4"

    for stage, child in children.items():
        history = client.get_metric_history(child.info.run_id, "eval_ppl")
        assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["eval_ppl"])) for r in _evals(run, stage)]
        assert child.data.params["train.learning_rate"] == "0.005" and child.data.params["data.format"] == "messages"
        assert len(client.get_metric_history(child.info.run_id, "loss")) == json.loads(
            (run / stage / "stage.json").read_text())["steps"]

    matrix = json.loads((run / "forgetting.json").read_text())
    quality = json.loads((run / "quality.json").read_text())
    metrics = parent.data.metrics
    for row in matrix["rows"]:
        for column in matrix["stages"]:
            assert metrics[f"forgetting/{row}/{column}/ppl"] == pytest.approx(matrix["ppl"][row][column])
    assert metrics["vet/best_eval_ppl"] == pytest.approx(min(r["eval_ppl"] for r in _evals(run, "vet")))
    assert metrics["quality/gguf_ppl"] == pytest.approx(quality["quantization"]["gguf_ppl"])
    assert metrics["targets/total"] == 2 and metrics["export/tiny-vet-q8_0.gguf/bytes"] > 0

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"recipe.yaml", "recipe.resolved.yaml", "report.md", "forgetting.json", "quality.json", "tables"} <= artifacts
    table = client.download_artifacts(parent.info.run_id, "tables/forgetting.md", str(run.parent))
    assert "after vet" in open(table).read()


@pytest.mark.slow
def test_wandb_offline_files_hold_a_group_with_a_run_per_stage_and_one_for_the_whole(tracked):
    run, _, _, _ = tracked
    runs = wandb_runs(run / "trackers")
    assert sorted(runs) == ["tiny-vet", "tiny-vet/general", "tiny-vet/vet"]
    assert len({r["run"].run_group for r in runs.values()}) == 1
    assert {r["run"].job_type for r in runs.values()} == {"run", "stage"}

    vet = runs["tiny-vet/vet"]
    logged = [(h["_step"], h["eval_ppl"]) for h in vet["history"] if "eval_ppl" in h]
    assert logged == [(r["step"], pytest.approx(r["eval_ppl"])) for r in _evals(run, "vet")]

    whole = runs["tiny-vet"]
    matrix = json.loads((run / "forgetting.json").read_text())
    assert whole["summary"]["forgetting/vet/general/ppl"] == pytest.approx(matrix["ppl"]["vet"]["general"])
    assert whole["summary"]["general/final_eval_ppl"] == pytest.approx(_evals(run, "general")[-1]["eval_ppl"])
    files = {c.path for a in whole["artifacts"] if a.type == "tunebook-run" for c in a.manifest.contents}
    assert {"recipe.resolved.yaml", "report.md", "forgetting.json"} <= files


@pytest.mark.slow
def test_tensorboard_events_hold_the_runs_numbers(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _, _ = tracked
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    matrix = json.loads((run / "forgetting.json").read_text())
    scalars = events.Tags()["scalars"]
    assert "run/forgetting/vet/vet/ppl" in scalars and "vet/eval_ppl" in scalars
    assert events.Scalars("run/forgetting/vet/vet/ppl")[0].value == pytest.approx(matrix["ppl"]["vet"]["vet"], rel=1e-6)
    assert [e.step for e in events.Scalars("vet/eval_ppl")] == [r["step"] for r in _evals(run, "vet")]


@pytest.mark.slow
def test_a_rerun_sends_nothing_again(tracked):
    run, url, first, again = tracked
    assert any(m.startswith("mlflow: run tiny-vet sent") for m in first)
    for name in ("tensorboard", "mlflow", "wandb"):
        assert f"{name}: up to date" in again
    assert not any(" sent" in m for m in again)
    assert len(wandb_runs(run / "trackers")) == 3


def test_an_unreachable_tracker_fails_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    recipe = load_recipe(shared_run_folder() / "recipe.yaml", ["report_to=[mlflow]", "name=never",
                                                                f"output_dir={tmp_path}"])
    with pytest.raises(TunebookError, match="does not answer") as raised:
        train_recipe(recipe, log=lambda m: None)
    assert "MLFLOW_TRACKING_URI" in str(raised.value) and not (tmp_path / "never").exists()


@pytest.mark.slow
def test_a_tracker_the_recipe_does_not_list_is_never_contacted(monkeypatch):
    from runner.run_dir import RunDir
    from runner.share.track import track

    run = trained_run()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_MODE", "online")  # no key here: W&B would refuse at once
    recipe = load_recipe(shared_run_folder() / "recipe.yaml", ["report_to=[tensorboard]"])
    logs = []
    track(recipe, RunDir(run), log=logs.append)  # an unreachable server or a missing key would fail here
    assert logs == ["tensorboard: up to date"]


def test_an_unknown_tracker_is_a_clear_recipe_error():
    with pytest.raises(RecipeError, match="allowed values: tensorboard, mlflow, wandb"):
        load_recipe(shared_run_folder() / "recipe.yaml", ["report_to=[comet]"])


def test_where_numbers_are_reported_is_not_part_of_the_experiment(tmp_path):
    """Adding trackers to a finished run retrains nothing: report_to is outside every stage's fingerprint (what a
    rerun compares); a change of the experiment (the seed) is inside it."""
    from runner.train.fingerprint import stage_fingerprints

    def prints(*sets):
        recipe = load_recipe(shared_run_folder() / "recipe.yaml", [f"output_dir={tmp_path}", *sets])
        return {name: p.digest for name, p in stage_fingerprints(recipe, ranks=1).items()}

    assert prints("report_to=[mlflow, wandb]") == prints("report_to=[]") == prints()
    assert all(a != b for a, b in zip(prints().values(), prints("seed=8").values()))


def test_wandb_online_without_a_key_fails_before_any_training(tmp_path):
    """In a process of its own: W&B keeps the mode of its first use in a process (the tests above are offline)."""
    import os
    import subprocess
    import sys

    from train_support import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))  # no stored W&B key
    done = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(shared_run_folder() / "recipe.yaml"),
                           "--set", "report_to=[wandb]", "--set", "name=never", "--set", f"output_dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "no W&B API key" in done.stderr and "WANDB_MODE=offline" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "never").exists()
