"""Everything that can be checked cheaply fails before training, with what is wrong and the fix."""
from __future__ import annotations

import sys

import pytest

from runner.errors import TunebookError
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from train_support import ROOT, chat_data, tiny_base, write_recipe


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


def test_a_failed_write_is_said_whichever_library_wrote():
    import errno

    from runner.errors import write_failure

    said = {str(write_failure(e)).splitlines()[0] for e in [
        OSError(errno.ENOSPC, "No space left on device", "/runs/r/s/adapter"),
        Exception("No space left on device (os error 28)"),  # the tokenizers library, saving
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 71872 vs 71764"),  # torch.save
        Exception("Error while serializing: IoError(File too large (os error 27))")]}  # safetensors
    assert said == {"cannot write (/runs/r/s/adapter): the disk is full [ENOSPC]",
                    "cannot write: the disk is full [ENOSPC]",
                    "cannot write a checkpoint whole: the disk is full or a file size limit was hit",
                    "cannot write: a file grew past the size limit (`ulimit -f`) [EFBIG]"}
    assert write_failure(ValueError("a bug")) is None and write_failure(OSError(errno.ENOENT, "gone")) is None


@pytest.mark.slow
def test_a_file_size_limit_during_training_is_an_error_and_the_rerun_goes_on(tmp_path):
    """`ulimit -f` (as a full disk would) stops a checkpoint half-written: a message with the fix, not a
    traceback; the rerun without the limit finishes the run."""
    import resource
    import subprocess

    from train_support import ROOT, two_stage_recipe

    path = two_stage_recipe(tmp_path)
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    limited = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(path)], cwd=ROOT, env=env, text=True,
                             capture_output=True, timeout=600,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (70_000, 70_000)))
    assert limited.returncode == 2, limited.stderr[-2000:]
    assert "Traceback" not in limited.stderr and "run the same command again" in limited.stderr
    assert "cannot write" in limited.stderr, limited.stderr[-2000:]
    again = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(path)], cwd=ROOT, env=env, text=True,
                           capture_output=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("command, says", [("train", "interrupted; what was finished is kept: run the same command "
                                                     "again to go on"), ("plan", "interrupted")])
def test_ctrl_c_outside_a_training_step_says_what_to_do(monkeypatch, capfd, command, says):
    """Ctrl-C while the forgetting matrix, the export or the gate runs (no training step to stop cleanly) comes
    out of click as Abort: it is said, with how to go on where a rerun goes on."""
    import runner.cli as cli
    import runner.pipeline
    import runner.cli.recipe

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.pipeline, "train_recipe", stop)  # where the Ctrl-C lands does not matter here
    monkeypatch.setattr(runner.cli.recipe, "rerun_table", stop)
    monkeypatch.setattr(sys, "argv", ["tunebook", command, str(ROOT / "recipes" / "quickstart.yaml")])
    with pytest.raises(SystemExit) as caught:
        cli.main()
    assert caught.value.code == 130
    assert capfd.readouterr().err.strip().endswith(says)
