"""data/vet_qa.jsonl: at least 400 valid veterinary conversations, none empty, none duplicated, and the
README's counts match the file."""
from __future__ import annotations

import json
from collections import Counter

from runner.data.formats import record_to_messages
from runner.recipe import FieldMap

from conftest import ROOT

DATA = ROOT / "data" / "vet_qa.jsonl"


def rows():
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]


def test_at_least_400_valid_alternating_conversations():
    data = rows()
    assert len(data) >= 400
    for row in data:
        messages = record_to_messages(row, "messages", FieldMap())
        roles = [m["role"] for m in messages]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))
        assert all(m["content"].strip() for m in messages)
        assert row["species"] and row["topic"]


def test_no_duplicates_and_wide_coverage():
    data = rows()
    questions = [row["messages"][0]["content"].strip().lower() for row in data]
    assert len(set(questions)) == len(questions)
    assert len({json.dumps(r, sort_keys=True) for r in data}) == len(data)
    species = Counter(r["species"] for r in data)
    for animal in ("dog", "cat", "rabbit", "horse"):
        assert species[animal] >= 20
    assert sum(1 for r in data if len(r["messages"]) > 2) >= 20  # some multi-turn


def test_no_invented_doses():
    import re

    dose = re.compile(r"\b\d+(\.\d+)?\s?(mg|ml|mcg|µg|milligrams?|millilit(re|er)s?)\s?(/|per)\s?(kg|lb)", re.I)
    for row in rows():
        for m in row["messages"]:
            assert not dose.search(m["content"]), m["content"]


def test_readme_counts_match():
    readme = (ROOT / "data" / "README.md").read_text()
    assert f"holds {len(rows())} " in readme
