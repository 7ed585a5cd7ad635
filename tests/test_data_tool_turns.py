"""Tool and function-call turns: read from every common shape, trained when the chat template writes them
(the calls are the assistant's to learn, the tool results never are), refused with the fix when it does not."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import trl

from data_support import make_recipe, prepare, trained_runs, write_jsonl
from runner.data.formats import normalize, record_to_messages
from runner.errors import TunebookError
from runner.recipe import FieldMap
from tiny_models import make_tokenizer

# TRL's training copy of the Qwen 2.5 template: tool calls and results, {% generation %} markers.
QWEN_TRAINING = Path(trl.__file__).parent / "chat_templates" / "qwen2_5_training.jinja"

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
MESSAGES = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": None, "tool_calls": [CALL]},
                         {"role": "tool", "content": "18 degrees, sunny"},
                         {"role": "assistant", "content": "It is 18 degrees and sunny."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                              {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                              {"from": "observation", "value": "18 degrees, sunny"},
                              {"from": "gpt", "value": "It is 18 degrees and sunny."}]}
OPENAI_FUNCTION = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                                {"role": "assistant", "content": "", "function_call": CALL["function"]},
                                {"role": "function", "name": "get_weather", "content": "18 degrees, sunny"},
                                {"role": "assistant", "content": "It is 18 degrees and sunny."}]}
PLAIN = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("row, fmt", [(MESSAGES, "messages"), (SHAREGPT, "sharegpt"), (OPENAI_FUNCTION, "messages")])
def test_every_shape_becomes_the_hugging_face_tool_format(row, fmt):
    turns = normalize(record_to_messages(row, fmt, FieldMap()), None, Counter())
    assert [t["role"] for t in turns] == ["user", "assistant", "tool", "assistant"]
    assert turns[1]["tool_calls"] == [{"type": "function",
                                       "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert turns[2]["content"] == "18 degrees, sunny"


def test_tool_turns_out_of_order_are_counted_not_kept():
    issues = Counter()
    tool_first = [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]
    assert normalize(tool_first, None, issues) is None and issues["non_alternating"] == 1


def test_template_that_writes_tools_trains_calls_not_results(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", [MESSAGES, OPENAI_FUNCTION, PLAIN])
    data = prepare(make_recipe(tmp_path, {"source": "d.jsonl"}, template=str(QWEN_TRAINING)), tok, tmp_path / "c")
    assert data.report.bad_records == 0 and len(data.train) == 3
    runs = [trained_runs(e, tok) for e in data.train if "get_weather" in tok.decode(e["input_ids"])]
    assert len(runs) == 2
    for trained in runs:
        text = "".join(trained)
        assert "get_weather" in text and "It is 18 degrees and sunny." in text  # the call and the answer
        assert "18 degrees, sunny" not in text                                   # the tool's output is input


def test_template_without_tools_refuses_with_the_fix(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", [PLAIN, MESSAGES])
    with pytest.raises(TunebookError, match=r"(?s)d\.jsonl:2: has tool calls or tool results, and the chat "
                                            r"template does not write tool calls.*fix: use a chat template.*"
                                            r"on_bad_record: skip.*plain user/assistant"):
        prepare(make_recipe(tmp_path, {"source": "d.jsonl"}, template="llama-3"), tok, tmp_path / "c")
    data = prepare(make_recipe(tmp_path, {"source": "d.jsonl", "on_bad_record": "skip"}, template="llama-3"),
                   tok, tmp_path / "c2")
    assert len(data.train) == 1 and data.report.bad_records == 1
    assert "tool calls" in json.dumps(data.report.bad_reasons)
