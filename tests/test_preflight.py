"""The preflight of `validate` and `plan`: a recipe that cannot run fails before any model loads, each
problem at the recipe's file:line with its fix; what is not checked (the hub, offline) is said."""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections import namedtuple

import pytest

from conftest import ROOT
from runner.preflight import preflight
from runner.recipe.schema import load_recipe_located
from train_support import chat_data, tiny_base, write_recipe


def recipe_text(base: str, source: str = "d.jsonl", template: str = "llama-3", output: str = "runs", extra: str = "") -> str:
    return f"""
        name: pf
        output_dir: {output}
        model: {{base: {base}, chat_template: {template}}}
        stages:
          - name: s
            data: {{source: {source}, format: messages}}
            train: {{max_steps: 2, save_steps: 1}}
        {extra}"""


def check(tmp_path, text: str, **kwargs):
    path = write_recipe(tmp_path, text)
    recipe, located = load_recipe_located(path)
    return path, preflight(recipe, located, **kwargs)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


def test_a_runnable_recipe_passes_and_estimates_the_disk(tmp_path, base):
    chat_data(tmp_path / "d.jsonl", 4)
    _, found = check(tmp_path, recipe_text(base, output=tmp_path / "runs", extra="export: {quantization: q8_0}"))
    assert found.problems == []
    [disk] = [n for n in found.notes if n.startswith("disk:")]
    assert "to write" in disk and "free" in disk


@pytest.mark.parametrize("change, line, message, fix", [
    (dict(source="missing.jsonl"), 7, "data file not found: missing.jsonl", "check the path"),
    (dict(source="package:no_such_module_here"), 7, "no installed Python package", "pip install no-such-module-here"),
    (dict(template="gemmma"), 4, "unknown chat template 'gemmma'", "did you mean 'gemma'?"),
    (dict(template="mine.jinja"), 4, "chat template file not found: mine.jinja", "named template"),
    (dict(base="nothere/model.gguf"), 4, "model.base not found", "check the path"),
])
def test_each_problem_names_the_recipe_line_and_the_fix(tmp_path, base, change, line, message, fix):
    chat_data(tmp_path / "d.jsonl", 4)
    path, found = check(tmp_path, recipe_text(**{"base": base, **change}))
    [problem] = found.problems
    assert (problem.loc.source, problem.loc.line) == (str(path), line)
    assert message in problem.message and fix in problem.fix


def test_a_template_file_that_does_not_parse_names_its_line(tmp_path, base):
    chat_data(tmp_path / "d.jsonl", 4)
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m.content }\n")
    _, found = check(tmp_path, recipe_text(base, template="bad.jinja"))
    [problem] = found.problems
    assert "bad.jinja:2: the chat template does not parse" in problem.message


def test_an_evaluation_set_with_a_bad_line_fails_before_any_training(tmp_path, base):
    chat_data(tmp_path / "d.jsonl", 4)
    good = '{"id": "a", "question": "q?", "reference": "r", "refer": false, "warn": false}'
    (tmp_path / "eval.jsonl").write_text(good + "\n" + good.replace("false}", "maybe}") + "\n")
    path, found = check(tmp_path, recipe_text(base, output=tmp_path / "runs",
                                              extra="export: {quantization: q8_0}\n        eval: {data: eval.jsonl}"))
    [problem] = found.problems
    assert (problem.loc.source, problem.loc.line) == (str(path), 10)
    assert "eval.jsonl:2: not valid JSON" in problem.message and "one JSON object per line" in problem.fix
    from runner.errors import TunebookError
    from runner.pipeline import train_recipe
    from runner.recipe import load_recipe

    with pytest.raises(TunebookError, match="eval.jsonl:2: not valid JSON"):  # train, without the preflight
        train_recipe(load_recipe(path))
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_an_output_folder_that_cannot_be_written(tmp_path, base):
    chat_data(tmp_path / "d.jsonl", 4)
    (tmp_path / "afile").write_text("")
    _, found = check(tmp_path, recipe_text(base, output=tmp_path / "afile" / "runs"))
    [problem] = found.problems
    assert problem.path == "output_dir" and "is a file" in problem.message


def test_too_little_disk_room_is_a_problem(tmp_path, base, monkeypatch):
    # A full disk cannot be made here: the free space is what is replaced.
    chat_data(tmp_path / "d.jsonl", 4)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    _, found = check(tmp_path, recipe_text(base, output=tmp_path / "runs", extra="export: {quantization: f32}"))
    [problem] = found.problems
    assert "not enough room" in problem.message and "another disk" in problem.fix


def test_hub_ids_are_checked_only_when_the_hub_answers(tmp_path, base, monkeypatch):
    # No hub here: unreachable is the real case; the answering hub is replaced (repo_exists) to see the check.
    _, found = check(tmp_path, recipe_text("some-org/some-model", source="some-org/some-data"),
                     hub_unreachable=lambda: "HF_HUB_OFFLINE is set")
    assert found.problems == []
    assert any("hub ids not checked (HF_HUB_OFFLINE is set)" in n and "some-org/some-model" in n and
               "some-org/some-data" in n for n in found.notes)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_exists", lambda self, name, repo_type=None: name != "some-org/some-data")
    _, found = check(tmp_path, recipe_text("some-org/some-model", source="some-org/some-data"), hub_unreachable=lambda: None)
    [problem] = found.problems
    assert problem.path == "stages.0.data.source" and "no dataset 'some-org/some-data' on the hub" in problem.message


def test_validate_and_plan_fail_on_a_missing_data_file(tmp_path, base):
    path = write_recipe(tmp_path, recipe_text(base, source="missing.jsonl"))
    for command in ("validate", "plan"):
        res = subprocess.run([sys.executable, "-m", "runner.cli", command, str(path)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert f"{path}:7:" in res.stderr and "data file not found" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "runner.cli", "validate", "--schema-only", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_the_gguf_header_gives_the_model_shape_without_loading_it(tmp_path):
    from gguf import GGUFReader

    from runner.export.gguf_writer import write_gguf
    from runner.preflight import _folder_shape, _gguf_shape
    from tiny_gguf_models import llama_tokenizer, save, tiny_llama

    tokenizer = llama_tokenizer()
    folder = save(tiny_llama(tokenizer), tokenizer, tmp_path / "m")
    gguf = write_gguf(folder, tmp_path / "m.gguf", "f32")
    shape = _gguf_shape(gguf)
    assert shape["params"] == sum(int(t.n_elements) for t in GGUFReader(gguf).tensors)
    assert {k: v for k, v in shape.items() if k != "params"} == \
        {k: v for k, v in _folder_shape(folder).items() if k != "params"}
