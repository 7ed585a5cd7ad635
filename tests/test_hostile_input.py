"""Hostile and messy input: recipes built to exhaust time or memory, and data files as editors, exports and
accidents leave them. Each is a clear error naming file:line with a fix, or a counted skip; nothing valid
is lost and nothing shows a traceback."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from runner.data import sources
from runner.data.sources import BadRecords, open_source
from runner.errors import RecipeError, TunebookError
from runner.recipe import load_recipe
from runner.recipe.source import parse_set

MINIMAL = "name: r\nmodel: {base: some/model}\nstages: [{name: s, data: {source: some/data}, train: {max_steps: 1}}]\n"

BOMB = "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
               for p, c in zip([None, *"abcdefgh"], "abcdefghi"))


def problem_of(path):
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    [problem] = caught.value.problems
    return problem


def test_alias_bomb_fails_at_its_line_without_expanding(write):
    path = write("bomb.yaml", BOMB)  # 9 levels of 9 aliases: 387 million values once expanded
    assert len(BOMB) < 400
    tracemalloc.start()
    problem = problem_of(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "more than 10,000 values once its aliases are expanded" in problem.message
    assert problem.loc.source == str(path) and problem.loc.line == 5
    assert peak < 20 * 2**20, f"{peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("text, line, says", [
    ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", 1, "nests too deep"),
    ("".join("  " * i + "k:\n" for i in range(40)) + "  " * 40 + "v: 1\n", 33, "nests deeper than 32 levels"),
    ("name: r\nmodel: !!python/object:os.system x\n", 2, "YAML tags are not supported (found !!python/object:os.system)"),
    ("name: r\nlora: !custom {r: 8}\n", 2, "YAML tags are not supported (found !custom)"),
    ("name: r\nname: s\n", 2, "duplicate key"),
    ("a: *nothing\n", 1, "alias *nothing names no anchor"),
    ("- a\n- b\n", 1, "expected a mapping of keys, got a list"),
    ("'just text'\n", 1, "expected a mapping of keys, got text"),
])
def test_hostile_yaml_is_a_located_error(write, text, line, says):
    path = write("r.yaml", text)
    problem = problem_of(path)
    assert says in problem.message and (problem.loc.source, problem.loc.line) == (str(path), line)
    assert "Commented" not in problem.message and "Tagged" not in problem.message


def test_a_huge_recipe_is_refused_before_it_is_read(write):
    problem = problem_of(write("big.yaml", MINIMAL + "# " + "x" * 300_000 + "\n"))
    assert "a recipe is at most 256 KiB" in problem.message and "data.source" in problem.fix


def test_encodings(write, tmp_path):
    (tmp_path / "u16.yaml").write_text(MINIMAL, encoding="utf-16")
    problem = problem_of(tmp_path / "u16.yaml")
    assert "UTF-16 (little-endian)" in problem.message and "iconv -f UTF-16LE -t UTF-8" in problem.fix
    (tmp_path / "bom.yaml").write_text(MINIMAL, encoding="utf-8-sig")
    assert load_recipe(tmp_path / "bom.yaml").name == "r"
    (tmp_path / "latin1.yaml").write_bytes(MINIMAL.replace("some/data", "caf\xe9").encode("latin-1"))
    problem = problem_of(tmp_path / "latin1.yaml")
    assert "not UTF-8" in problem.message and problem.loc.line == 3


def test_set_values_are_bounded_too():
    with pytest.raises(RecipeError, match="more than 10,000 values"):
        parse_set("lora=" + "{" + BOMB.replace("\n", ", ") + "}")


def test_a_number_of_thousands_of_digits_is_an_error_not_a_traceback(write):
    digits = "1" + "0" * 5000
    assert "a number of 5,001 digits is too long to read" in problem_of(write("r.yaml", MINIMAL + f"seed: {digits}\n")).message
    with pytest.raises(RecipeError, match="5,001 digits is too long to read"):
        parse_set(f"lora.r={digits}")


# --------------------------------------------------------------------------------------------------- data

OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
LINE = json.dumps(OK)


def read(path, policy):
    bad = BadRecords(policy)
    return open_source(str(path), None).read(bad), bad


@pytest.mark.parametrize("name, content, kept, error", [
    ("deep.jsonl", f"{LINE}\n{'[' * 100_000}{']' * 100_000}\n{LINE}\n", 2, "deep.jsonl:2: not usable JSON (nested too deep"),
    ("deep.json", f"[{LINE}, {'[' * 100_000}{']' * 100_000}, {LINE}]", 2, "deep.json:1: not usable JSON (nested too deep"),
    ("types.jsonl", f"[1]\n2\n\"x\"\nnull\n{LINE}\n", 1, "types.jsonl:1: not a JSON object (it is a list)"),
    ("digits.jsonl", f"{LINE}\n{{\"n\": 1{'0' * 5000}}}\n", 1, "digits.jsonl:2: not usable JSON (a number of thousands"),
    ("cut.jsonl", f"{LINE}\n{LINE[:20]}", 1, "cut.jsonl:2: not valid JSON"),
    ("empty.jsonl", "", 0, "empty.jsonl: the file is empty"),
    ("blank.jsonl", " \n\t\r\n\n", 0, "blank.jsonl: the file is empty"),
    ("wide.csv", "prompt,completion\nhi,hello\nhi,hello,extra\n", 1, "wide.csv:3: has 3 fields, the header has 2"),
])
def test_bad_data_is_an_error_or_a_counted_skip(tmp_path, name, content, kept, error):
    path = tmp_path / name
    path.write_bytes(content.encode())
    with pytest.raises(TunebookError) as caught:
        read(path, "error")
    assert error in str(caught.value) and "\n    fix: " in str(caught.value)
    data, bad = read(path, "skip")
    assert len(data.records) == kept and bad.count >= 1


@pytest.mark.parametrize("encoding, line_end", [("utf-8-sig", "\n"), ("utf-8", "\r\n"), ("utf-8-sig", "\r\n")])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_bom_and_crlf_are_read_as_they_are(tmp_path, encoding, line_end, suffix):
    text = {".jsonl": f"{LINE}\n{LINE}\n", ".json": f"[\n{LINE},\n{LINE}\n]\n",
            ".csv": "prompt,completion\nhi,hello\n\"a, b\",\"c\"\"d\"\n"}[suffix]
    path = tmp_path / f"d{suffix}"
    path.write_bytes(text.replace("\n", line_end).encode(encoding))
    data, bad = read(path, "error")
    assert len(data.records) == 2 and bad.count == 0
    if suffix == ".csv":
        assert data.records[1].row == {"prompt": "a, b", "completion": 'c"d'}


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16 (little-endian)"), ("utf-16-be", "UTF-16 (big-endian)"),
                                            ("utf-32", "UTF-32 (little-endian)")])
def test_utf16_and_utf32_are_named(tmp_path, encoding, name):
    path = tmp_path / "d.jsonl"
    path.write_text(f"{LINE}\n", encoding=encoding)
    with pytest.raises(TunebookError, match=rf"d\.jsonl: the file is {name.replace('(', '.').replace(')', '.')} text"):
        read(path, "error")


def test_a_line_over_the_limit_is_skipped_without_holding_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "huge.jsonl"
    path.write_text(f'{{"x": "{"y" * 5000}"}}\n{LINE}\n')
    with pytest.raises(TunebookError, match=r"huge\.jsonl:1: the line is longer than"):
        read(path, "error")
    data, bad = read(path, "skip")
    assert [r.where for r in data.records] == [f"{path}:2"] and bad.count == 1


def test_a_folder_of_mixed_files_keeps_every_valid_record(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(f"{LINE}\nnot json\n{LINE}\n")
    (folder / "b.JSON").write_text(json.dumps([OK, OK, OK]))
    (folder / "c.json").write_text("")
    (folder / "d.parquet").write_bytes(b"PAR1 not really")
    (folder / "e.jsonl").write_text(f"{LINE}\n", encoding="utf-16")
    (folder / "notes.txt").write_text("not data")
    data, bad = read(folder, "skip")
    assert len(data.records) == 5
    assert bad.count == 4 and set(bad.reasons) == {"not valid JSON", "the file is empty", "not a readable Parquet file",
                                                   "the file is UTF-16"}
    with pytest.raises(TunebookError, match=r"mixed/a\.jsonl:2: not valid JSON"):
        read(folder, "error")


@pytest.mark.parametrize("content, says", [
    (b"hello, not a model\n", "is not a GGUF file"),
    (b"", "is not a GGUF file"),
    (None, "its tokenizer cannot be read"),  # a real GGUF cut off after 1,000 bytes
])
def test_eval_of_a_file_that_is_no_whole_gguf_is_an_error(tmp_path, content, says):
    from chat_support import tiny_gguf

    from runner.measure.evaluate import evaluate_target

    path = tmp_path / "model.gguf"
    if content is None:
        content = tiny_gguf("llama").read_bytes()[:1000]
    path.write_bytes(content)
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                      '{"role": "assistant", "content": "hello"}]}\n')
    with pytest.raises(TunebookError, match=says) as caught:
        evaluate_target(path, data=str(tmp_path / "d.jsonl"))
    assert "fix:" in str(caught.value)


def test_a_damaged_run_folder_is_read_as_far_as_it_holds(tmp_path):
    from runner.run_dir import StageDir
    from runner.train.metrics import read_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1, "loss": 2.0}\n[1, 2]\n\xff\xfe garbage\n{"step": "x"}\n{"step": 2, "loss": 1.5}\n{"st')
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]
    metrics.write_text('{"step": 1, "loss": "abc", "eval_loss": [1], "seconds": 3.5, "mix_tokens": 7}\n')
    assert read_metrics(metrics) == [{"step": 1, "seconds": 3.5}]  # what is readable of a hand-edited row
    stage = StageDir(tmp_path / "s@abc")
    stage.path.mkdir()
    stage.fingerprint_file.write_text("[1, 2]")
    assert stage.fingerprint() is None
    stage.outcome_file.write_text("{}")
    with pytest.raises(TunebookError, match=r"not a stage outcome tunebook can read \(fields missing or unknown\)"):
        stage.outcome()


def test_an_out_path_that_names_the_wrong_thing_is_refused_before_any_work(tmp_path):
    from runner.cli.options import writable

    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    assert writable(tmp_path / "new" / "deeper", "--out", folder=True) == tmp_path / "new" / "deeper"
    for path, folder, says in ((tmp_path / "a-file", True, "that is a file, not a folder"),
                               (tmp_path / "a-folder", False, "that is a folder, not a file"),
                               (tmp_path / "a-file" / "x.yaml", False, "a-file is a file, so nothing can be made")):
        with pytest.raises(TunebookError, match=says):
            writable(path, "--out", folder=folder)


def test_names_and_folders_too_long_for_a_file_system_are_refused(write, tmp_path):
    from runner.preflight import preflight
    from runner.recipe.schema import load_recipe_located

    problem = problem_of(write("r.yaml", MINIMAL.replace("name: r", "name: " + "r" * 300)))
    assert (problem.loc.line, problem.path) == (1, "name") and "300 characters is too long (at most 128)" in problem.message
    problem = problem_of(write("s.yaml", MINIMAL.replace("name: s,", "name: " + "s" * 200 + ",")))
    assert problem.path == "stages.0.name" and "too long" in problem.message
    recipe, located = load_recipe_located(write("o.yaml", MINIMAL), [f"output_dir={tmp_path / ('o' * 300)}"])
    [found] = [p for p in preflight(recipe, located, hub_unreachable=lambda: "offline").problems
               if p.path == "output_dir"]
    assert "a folder name of 300 bytes is longer than file systems allow" in found.message


def test_a_port_taken_and_a_host_that_is_no_address_get_their_own_fix():
    import socket

    from chat.engine import ChatError
    from chat.serve import check_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ChatError, match="choose another --port"):
            check_port("127.0.0.1", taken.getsockname()[1])
    with pytest.raises(ChatError, match="check --host"):
        check_port("999.1.1.1", 8000)


def test_a_control_character_in_a_data_line_is_said_once(tmp_path):
    path = tmp_path / "ctl.jsonl"
    path.write_text(LINE + "\n" + '{"messages": "a\tb"}' + "\n")
    with pytest.raises(TunebookError) as caught:
        read(path, "error")
    assert "ctl.jsonl:2: not valid JSON (Invalid control character at column" in str(caught.value)


def test_eval_names_a_misspelled_stage_before_loading_anything(tmp_path):
    from conftest import RECIPES

    from runner.measure.evaluate import evaluate_target

    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # never opened: the stage is checked first
    with pytest.raises(RecipeError, match="no stage named 'vett'"):
        evaluate_target(tmp_path / "model.gguf", RECIPES / "quickstart.yaml", stage="vett")


def test_a_symbolic_link_loop_is_an_error_not_a_traceback(tmp_path):
    (tmp_path / "a.yaml").symlink_to("b.yaml")
    (tmp_path / "b.yaml").symlink_to("a.yaml")
    with pytest.raises(RecipeError, match="cannot follow the path"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "a.jsonl").symlink_to("b.jsonl")
    (tmp_path / "b.jsonl").symlink_to("a.jsonl")
    with pytest.raises(TunebookError, match="data file not found"):
        open_source(str(tmp_path / "a.jsonl"), None)


def test_a_folder_that_is_no_run_is_not_told_to_export(tmp_path):
    from runner.run_dir import RunDir

    with pytest.raises(TunebookError, match="is not a run directory and holds no .gguf file") as caught:
        RunDir(tmp_path).find_gguf()
    assert "tunebook export" not in str(caught.value)



def test_lora_on_no_modules_is_refused(write):
    problem = problem_of(write("r.yaml", MINIMAL + "lora: {target_modules: []}\n"))
    assert problem.path == "lora.target_modules" and "all-linear" in problem.fix


def test_true_is_no_count(write):
    problem = problem_of(write("r.yaml", MINIMAL + "lora: {r: true}\n"))
    assert problem.path == "lora.r" and "expected a whole number, got True" in problem.message
    assert load_recipe(write("s.yaml", MINIMAL + "lora: {r: 1e1}\n")).lora.r == 10  # a float that is whole still is


def test_a_pipe_as_data_or_evaluation_set_is_refused_not_waited_on(tmp_path):
    import os

    from eval.eval_set import EvalSetError, read_eval_set

    os.mkfifo(tmp_path / "d.jsonl")  # opening it to read would wait for a writer that never comes
    with pytest.raises(TunebookError, match="not a regular file or folder"):
        open_source(str(tmp_path / "d.jsonl"), None)
    with pytest.raises(EvalSetError, match="not a regular file"):
        read_eval_set(tmp_path / "d.jsonl")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "folder" / "e.jsonl")  # inside a data folder, only regular files count
    with pytest.raises(TunebookError, match="folder has no data files"):
        open_source(str(tmp_path / "folder"), None)


def test_extends_naming_a_folder_says_so(write, tmp_path):
    (tmp_path / "defaults").mkdir()
    problem = problem_of(write("r.yaml", "extends: defaults\n" + MINIMAL))
    assert problem.message.startswith("`extends` names a folder") and "lora-sft.yaml" in problem.fix
