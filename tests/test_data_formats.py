"""Every dataset format becomes the same conversation; auto detection says what it chose."""
from __future__ import annotations

from collections import Counter

import pytest

from data_support import make_recipe, prepare, trained_runs, write_jsonl
from runner.data.formats import BadRecord, detect_format, normalize, record_to_messages
from runner.errors import TunebookError
from runner.recipe import FieldMap
from tiny_models import make_tokenizer

U, A = "user", "assistant"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def roles(turns):
    return [t["role"] for t in turns]


def test_sharegpt_role_aliases():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
                             {"from": "chatgpt", "value": "b"}, {"from": "human", "value": "q3"},
                             {"from": "bard", "value": "c"}, {"from": "human", "value": "q4"},
                             {"from": "bing", "value": "d"}]}
    turns = record_to_messages(row, "sharegpt", FieldMap())
    assert roles(turns) == ["system", U, A, U, A, U, A, U, A]
    assert [t["content"] for t in turns] == ["Be brief.", "hi", "a", "q2", "b", "q3", "c", "q4", "d"]


def test_messages_format_and_content_parts():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "this?"}]},
                        {"role": "assistant", "content": "A cat."}], "topic": "x"}
    assert record_to_messages(row, "messages", FieldMap()) == [
        {"role": U, "content": "What is this?"}, {"role": A, "content": "A cat."}]


def test_alpaca_with_and_without_input():
    with_input = {"instruction": "Summarise.", "input": "Cats sleep a lot.", "output": "Cats nap."}
    without = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    assert record_to_messages(with_input, "alpaca", FieldMap()) == [
        {"role": U, "content": "Summarise.\n\nCats sleep a lot."}, {"role": A, "content": "Cats nap."}]
    assert record_to_messages(without, "alpaca", FieldMap()) == [
        {"role": U, "content": "Say hi."}, {"role": A, "content": "Hi!"}]


def test_prompt_completion_plain_and_conversational():
    plain = {"prompt": "2+2?", "completion": "4"}
    assert record_to_messages(plain, "prompt_completion", FieldMap()) == [
        {"role": U, "content": "2+2?"}, {"role": A, "content": "4"}]
    conv = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}
    assert roles(record_to_messages(conv, "prompt_completion", FieldMap())) == [U, A]


def test_field_mappings():
    fields = FieldMap(conversations="dialog", role="speaker", content="text", system="persona")
    row = {"dialog": [{"speaker": "human", "text": "hi"}, {"speaker": "gpt", "text": "hello"}], "persona": "Be nice."}
    assert detect_format([row], fields)[0] == "sharegpt"
    assert record_to_messages(row, "sharegpt", fields) == [
        {"role": "system", "content": "Be nice."}, {"role": U, "content": "hi"}, {"role": A, "content": "hello"}]
    alpaca = FieldMap(instruction="question", output="answer")
    assert record_to_messages({"question": "Q?", "answer": "A."}, "alpaca", alpaca)[1]["content"] == "A."


@pytest.mark.parametrize("row, fmt", [
    ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages"),
    ({"instruction": "x", "input": "", "output": "y"}, "alpaca"),
    ({"prompt": "x", "completion": "y"}, "prompt_completion"),
])
def test_detect_format(row, fmt):
    found, why = detect_format([row], FieldMap())
    assert found == fmt and why


def test_detect_format_failure_names_keys_and_fix():
    with pytest.raises(TunebookError, match=r"(?s)their keys: a, b.*data\.format.*data\.fields"):
        detect_format([{"a": 1, "b": 2}], FieldMap())


def test_bad_records():
    with pytest.raises(BadRecord, match="unknown role 'narrator'"):
        record_to_messages({"conversations": [{"from": "narrator", "value": "x"}]}, "sharegpt", FieldMap())
    with pytest.raises(BadRecord, match="no 'conversations'"):
        record_to_messages({"messages": []}, "sharegpt", FieldMap())
    with pytest.raises(BadRecord, match="no 'output'"):
        record_to_messages({"instruction": "x"}, "alpaca", FieldMap())


def test_normalize_counts_repairs_and_skips():
    issues = Counter()
    t = lambda r, c="x": {"role": r, "content": c}  # noqa: E731
    assert normalize([], None, issues) is None
    assert normalize([t(U, "  "), t(A, "")], None, issues) is None
    assert normalize([t(U), t(A, " ")], None, issues) is None               # an empty turn
    assert normalize([t(U), t(U), t(A)], None, issues) is None              # not alternating
    assert normalize([t(U), t("system"), t(A)], None, issues) is None       # system mid-way
    assert roles(normalize([t(A), t(U), t(A)], None, issues)) == [U, A]     # leading assistant dropped
    assert roles(normalize([t(U), t(A), t(U)], None, issues)) == [U, A]     # trailing user dropped
    assert issues == Counter(empty=2, empty_turn=1, non_alternating=2, leading_assistant_dropped=1,
                             trailing_user_dropped=1)


def test_system_prompt_prepended():
    issues = Counter()
    plain = normalize([{"role": U, "content": "hi"}, {"role": A, "content": "yo"}], "You are VetAI.", issues)
    assert plain[0] == {"role": "system", "content": "You are VetAI."}
    own = normalize([{"role": "system", "content": "Be brief."}, {"role": U, "content": "hi"},
                     {"role": A, "content": "yo"}], "You are VetAI.", issues)
    assert own[0] == {"role": "system", "content": "You are VetAI.\n\nBe brief."} and len(own) == 3


@pytest.mark.parametrize("rows, fmt", [
    ([{"conversations": [{"from": "human", "value": "What should I feed my cat?"},
                         {"from": "gpt", "value": "A balanced diet."}]}], "sharegpt"),
    ([{"messages": [{"role": "user", "content": "What should I feed my cat?"},
                    {"role": "assistant", "content": "A balanced diet."}]}], "messages"),
    ([{"instruction": "What should I feed my cat?", "output": "A balanced diet."}], "alpaca"),
    ([{"prompt": "What should I feed my cat?", "completion": "A balanced diet."}], "prompt_completion"),
])
def test_each_format_end_to_end_with_auto(tmp_path, tok, rows, fmt):
    write_jsonl(tmp_path / "d.jsonl", rows)
    logs: list[str] = []
    recipe = make_recipe(tmp_path, {"source": "d.jsonl", "format": "auto", "system_prompt": "You are VetAI."})
    data = prepare(recipe, tok, tmp_path / "cache", logs)
    assert data.report.format == fmt and data.report.format_note
    assert any(f"format: auto -> {fmt}" in line for line in logs)
    [example] = data.train
    assert trained_runs(example, tok) == ["A balanced diet.<|eot_id|>"]
    assert tok.decode(example["input_ids"]).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are VetAI.<|eot_id|>")


def test_skips_are_counted_in_the_report(tmp_path, tok):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    rows = [good, {"conversations": []}, {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                                             {"from": "gpt", "value": "c"}]},
            {"conversations": [{"from": "gpt", "value": "cut"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    report = prepare(make_recipe(tmp_path, {"source": "d.jsonl", "format": "sharegpt"}), tok, tmp_path / "c").report
    assert (report.records_read, report.conversations, report.empty_conversations, report.non_alternating,
            report.leading_assistant_dropped) == (4, 2, 1, 1, 1)
