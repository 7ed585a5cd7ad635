"""Everything that can be checked cheaply fails before training, with what is wrong and the fix."""
from __future__ import annotations

import sys

import pytest

from runner.errors import TunebookError
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from train_support import chat_data, tiny_base, write_recipe


def recipe_with(tmp_path, base: str, extra_model: str = "", output_dir: str | None = None, data_rows=None):
    chat_data(tmp_path / "d.jsonl", 12)
    if data_rows is not None:
        (tmp_path / "d.jsonl").write_text(data_rows)
    return load_recipe(write_recipe(tmp_path, f"""
        name: early
        output_dir: {output_dir or tmp_path / 'runs'}
        model: {{base: "{base}", chat_template: llama-3, max_seq_length: 64{extra_model}}}
        stages:
          - name: s
            data: {{source: d.jsonl, format: messages, val_size: 0}}
            train: {{max_steps: 2}}
        """))


def no_training(msg):
    assert "training on" not in msg, "training started"


def test_missing_local_base(tmp_path):
    with pytest.raises(TunebookError, match="not found.*\n.*fix"):
        train_recipe(recipe_with(tmp_path, str(tmp_path / "no-such-model")), log=no_training)


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: the offline branch is the one a test can reach
    with pytest.raises(TunebookError, match="not in the local hub cache.*\n.*fix"):
        train_recipe(recipe_with(tmp_path, "some-org/some-model-that-is-not-cached"), log=no_training)


def test_model_that_does_not_fit(tmp_path, monkeypatch):
    import psutil

    base = tiny_base(tmp_path)
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=1000))
    with pytest.raises(TunebookError, match="needs about .* GiB of RAM.*\n.*load_in_4bit"):
        train_recipe(recipe_with(tmp_path, str(base)), log=no_training)


def test_4bit_without_bitsandbytes(tmp_path, monkeypatch):
    base = tiny_base(tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(TunebookError, match="needs bitsandbytes"):
        train_recipe(recipe_with(tmp_path, str(base), ", load_in_4bit: true"), log=no_training)


def test_output_dir_not_writable(tmp_path):
    base = tiny_base(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TunebookError, match="cannot write to .*\n.*fix"):
        train_recipe(recipe_with(tmp_path, str(base), output_dir=str(blocker / "runs")), log=no_training)


def test_data_without_trainable_tokens(tmp_path):
    base = tiny_base(tmp_path)
    rows = '{"messages": [{"role": "user", "content": "hello"}]}\n' * 5
    with pytest.raises(TunebookError) as info:
        train_recipe(recipe_with(tmp_path, str(base), data_rows=rows), log=no_training)
    assert "fix" in str(info.value)


@pytest.mark.slow
def test_a_rerun_that_fails_on_its_data_or_base_leaves_the_finished_run_as_it_was(tmp_path):
    """The recipe is recorded and the stage links are switched only once the base and the data have passed:
    a broken edit fails and the run still exports, evaluates and plans as before it."""
    from runner.run_dir import RunDir
    from train_support import two_stage_recipe

    path = two_stage_recipe(tmp_path)
    train_recipe(load_recipe(path), log=lambda m: None)
    run = RunDir.of(load_recipe(path))
    recorded, links = run.recipe_file.read_text(), {s: run.current_version(s) for s in ("general", "vet")}
    good = (tmp_path / "vet.jsonl").read_text()
    (tmp_path / "vet.jsonl").write_text(good + "{not json\n")
    with pytest.raises(TunebookError, match="vet.jsonl:33: not valid JSON"):
        train_recipe(load_recipe(path), log=no_training)
    (tmp_path / "vet.jsonl").write_text(good)
    with pytest.raises(TunebookError, match="not found"):
        train_recipe(load_recipe(path, [f"model.base={tmp_path / 'nope'}"]), log=no_training)
    assert run.recipe_file.read_text() == recorded
    assert {s: run.current_version(s) for s in ("general", "vet")} == links
    assert run.final_outcome(run.load_recipe()).done


def test_a_second_train_of_the_same_run_is_refused_while_the_first_runs(tmp_path):
    from runner.run_dir import RunDir

    base = tiny_base(tmp_path)
    recipe = recipe_with(tmp_path, str(base))
    run = RunDir.of(recipe)
    run.path.mkdir(parents=True)
    with run.locked():  # as another `tunebook train` of it holds it
        with pytest.raises(TunebookError, match=r"in use by another tunebook train \(pid \d+\)"):
            train_recipe(recipe, log=no_training)
    assert not run.recipe_file.exists()
    train_recipe(recipe, log=lambda m: None)  # once it has ended
    assert run.final_outcome(recipe).done
