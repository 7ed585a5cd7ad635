"""Length policy and report, the deterministic split, and the tokenized-data cache."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rich.console import Console

from data_support import ROOT_DIR, make_recipe, prepare, write_jsonl
from chat.templates import template_text
from runner.data.split import split_indices
from runner.data.report import render_report
from runner.errors import TunebookError
from tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def rows(n: int, long_question_every: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        question = "How often should I walk my dog? " * (40 if long_question_every and i % long_question_every == 0 else 1)
        out.append({"messages": [{"role": "user", "content": f"{i}: {question}"},
                                 {"role": "assistant", "content": "Twice a day. " * (1 + i % 7)}]})
    return out


def test_length_report_truncate(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", rows(20, long_question_every=5))
    report = prepare(make_recipe(tmp_path, {"source": "d.jsonl"}, max_length=96), tok, tmp_path / "c").report
    assert report.length["count"] == 20 and report.length["max"] > 96
    assert report.length["p50"] <= report.length["p95"] <= report.length["max"]
    # the 4 long questions fill the whole window before the reply: truncated, then left out
    assert report.truncated == 4 and report.zero_trainable == 4 and report.train_size == 16
    assert report.pct_truncated == pytest.approx(20.0)
    console = Console(record=True, width=120)
    console.print(render_report(report))
    shown = console.export_text()
    assert "4 truncated (20.0%)" in shown and "4 samples left out" in shown
    assert set(report.to_dict()) >= {"records_read", "length", "pct_truncated", "pct_dropped", "train_size", "cache_hit"}


def test_length_policy_drop(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", rows(20, long_question_every=5))
    report = prepare(make_recipe(tmp_path, {"source": "d.jsonl", "truncation": "drop"}, max_length=96), tok,
                     tmp_path / "c").report
    assert report.dropped_too_long == 4 and report.truncated == 0 and report.pct_dropped == pytest.approx(20.0)
    assert report.train_size == 16


def test_truncated_examples_fit_and_keep_their_reply_start(tmp_path, tok):
    long_reply = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Twice a day. " * 50}]}]
    write_jsonl(tmp_path / "d.jsonl", long_reply)
    data = prepare(make_recipe(tmp_path, {"source": "d.jsonl"}, max_length=64), tok, tmp_path / "c")
    [example] = data.train
    assert len(example["input_ids"]) == 64 and data.report.truncated == 1
    assert example["labels"][-1] != -100


def test_no_trainable_token_anywhere_is_a_clear_error(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", rows(5, long_question_every=1))
    with pytest.raises(TunebookError, match=r"(?s)stage 's': no sample has a token to train on.*zero trainable 5.*max_seq_length"):
        prepare(make_recipe(tmp_path, {"source": "d.jsonl"}, max_length=64), tok, tmp_path / "c")


def test_no_usable_conversation_is_a_clear_error(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", [{"messages": []}, {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TunebookError, match=r"no usable conversation \(records read 2, empty 2\)"):
        prepare(make_recipe(tmp_path, {"source": "d.jsonl"}), tok, tmp_path / "c")


def test_split_fraction_and_count():
    train, val = split_indices(100, 0.1, seed=7)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert split_indices(100, 0.1, seed=7) == (train, val)
    assert split_indices(100, 0.1, seed=8)[1] != val
    assert len(split_indices(100, 12, seed=7)[1]) == 12
    assert split_indices(100, 0, seed=7) == (list(range(100)), [])
    with pytest.raises(TunebookError, match="leaves no training data"):
        split_indices(10, 10, seed=7)


def test_split_is_the_same_in_another_process():
    code = ("import json; from runner.data.split import split_indices; "
            "print(json.dumps(split_indices(1000, 0.05, 3407)[1]))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT_DIR,
                           env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert json.loads(other.stdout) == split_indices(1000, 0.05, 3407)[1]


def test_split_rows_are_stable_across_runs(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", rows(40))
    recipe = make_recipe(tmp_path, {"source": "d.jsonl", "val_size": 0.25})
    first = prepare(recipe, tok, tmp_path / "c1")
    second = prepare(recipe, tok, tmp_path / "c2")  # a fresh cache: computed again
    assert not second.report.cache_hit
    assert first.val == second.val and first.train == second.train and len(first.val) == 10


def test_cache_hit_and_misses(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", rows(12))
    cache = tmp_path / "cache"
    logs: list[str] = []
    recipe = make_recipe(tmp_path, {"source": "d.jsonl", "val_size": 2})
    first = prepare(recipe, tok, cache, logs)
    again = prepare(recipe, tok, cache, logs)
    assert not first.report.cache_hit and again.report.cache_hit
    assert any("cache hit" in line for line in logs)
    assert (again.train, again.val) == (first.train, first.val)
    assert again.report.train_size == first.report.train_size

    changed_setting = make_recipe(tmp_path, {"source": "d.jsonl", "val_size": 2, "train_on": "all"})
    changed_length = make_recipe(tmp_path, {"source": "d.jsonl", "val_size": 2}, max_length=256)
    (tmp_path / "t.jinja").write_text(template_text("llama-3") + "\n")
    changed_template = make_recipe(tmp_path, {"source": "d.jsonl", "val_size": 2}, template="t.jinja")
    for other in (changed_setting, changed_length, changed_template):
        assert not prepare(other, tok, cache).report.cache_hit

    other_tok = make_tokenizer(tmp_path / "tok2")
    other_tok.add_tokens(["<|new|>"])
    assert not prepare(recipe, other_tok, cache).report.cache_hit

    write_jsonl(tmp_path / "d.jsonl", rows(13))  # the source changed
    assert not prepare(recipe, tok, cache).report.cache_hit


def test_packing_is_reported_and_not_part_of_the_cache_key(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", rows(12))
    plain = prepare(make_recipe(tmp_path, {"source": "d.jsonl"}), tok, tmp_path / "c").report
    packed = prepare(make_recipe(tmp_path, {"source": "d.jsonl"}, train={"max_steps": 1, "packing": True}), tok,
                     tmp_path / "c").report
    assert plain.packed_rows is None and packed.cache_hit
    assert 0 < packed.packed_rows < 12 and 0.5 < packed.packing_efficiency <= 1
