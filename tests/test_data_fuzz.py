"""Data files as they come: records of every shape and wrong type, JSON Lines / JSON arrays / CSV, cut off
anywhere, with a byte-order mark, CRLF, UTF-16/32, deep nesting and garbage lines. Reading them and turning
them into conversations only ever gives a TunebookError that names the file (and the line) with a fix, under
`on_bad_record: error`; under `skip`, every valid JSON Lines record before a cut is kept."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runner.data.prepare import read_conversations
from runner.data.report import DataReport
from runner.data.sources import BadRecords, open_source
from runner.errors import TunebookError
from runner.recipe import DataConfig

WORKDIR = Path(tempfile.mkdtemp(prefix="tunebook-data-fuzz-"))

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=8)
ROLES = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "function_call", "observation", "narrator"])
TURN = st.fixed_dictionaries({"role": ROLES | JSON, "content": st.text(max_size=12) | JSON},
                             optional={"tool_calls": st.just([{"function": {"name": "f", "arguments": "{}"}}]) | JSON})
RECORD = st.one_of(
    st.integers(1, 3).map(lambda n: {"messages": [{"role": r, "content": f"{r} text"}
                                                  for _ in range(n) for r in ("user", "assistant")]}),  # valid
    st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=4).map(lambda roles: {"messages": [
        {"role": r, "content": f"{r} text"} for r in roles]}),                     # valid and near-valid
    st.fixed_dictionaries({"messages": st.lists(TURN, max_size=4) | JSON}),        # wrong types inside
    JSON,                                                                          # not a record at all
)
GARBAGE = st.one_of(st.text(max_size=20), st.integers(2, 3000).map(lambda n: "[" * n + "]" * n),
                    st.just('{"messages": [{"role": "user", "content": "\\ud800"}]}'), st.just("{"))


@st.composite
def data_file(draw) -> tuple[str, bytes, int | None]:
    """(suffix, bytes, valid JSON Lines records that must survive under skip, or None when not counted)."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv"]))
    records = draw(st.lists(RECORD, max_size=8))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    valid = None
    if suffix == ".jsonl":
        lines = [json.dumps(r) for r in records]
        valid = sum(isinstance(r, dict) for r in records)
        for _ in range(draw(st.integers(0, 2))):
            lines.insert(draw(st.integers(0, len(lines))), draw(GARBAGE))
            valid = None  # garbage may happen to be a valid object
        text = newline.join(lines) + newline
    elif suffix == ".json":
        text = "[" + ("," + newline).join(json.dumps(r) for r in records) + "]"
    else:
        text = "prompt,completion" + newline + newline.join(
            ",".join(json.dumps(str(v)) for v in (r.values() if isinstance(r, dict) else [r])) for r in records)
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
        valid = None
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "utf-16", "utf-32", "latin-1"]))
    if encoding == "utf-8-sig":
        data = b"\xef\xbb\xbf" + data
    elif encoding != "utf-8":
        try:
            data = data.decode("utf-8").encode(encoding)
        except (UnicodeDecodeError, UnicodeEncodeError):
            pass
        valid = None
    return suffix, data, valid


def located(exc: TunebookError, path: Path) -> bool:
    text = str(exc)
    return path.name in text and "\n    fix: " in text


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data_file(), st.sampled_from(["error", "skip"]), st.sampled_from(["auto", "messages", "prompt_completion"]))
def test_data_files_only_raise_located_errors_and_lose_nothing_valid(case, policy, fmt):
    suffix, content, valid = case
    path = WORKDIR / f"data{suffix}"
    path.write_bytes(content)
    bad = BadRecords(policy)
    try:
        data = open_source(str(path), None).read(bad)
    except TunebookError as exc:
        assert located(exc, path), str(exc)
        event(f"read: error ({str(exc).split(': ', 1)[1].split(' (')[0].splitlines()[0][:30]})")
        return
    event(f"read: {'some' if data.records else 'no'} records, {'some' if bad.count else 'none'} skipped")
    if policy == "skip" and valid is not None:
        assert len(data.records) == valid
    cfg = DataConfig(source=str(path), format=fmt, on_bad_record=policy)
    try:
        conversations = read_conversations(data.records, cfg, DataReport(), bad, lambda _: None,
                                           tool_problem=lambda: "the chat template does not write tool calls")
    except TunebookError as exc:
        assert located(exc, path) or "format: auto could not recognise" in str(exc), str(exc)
        event("conversations: error")
        return
    event(f"conversations: {'some' if conversations else 'none'}")
    for conversation in conversations:
        assert all(isinstance(turn["content"], str) for turn in conversation)
