"""data/vet_eval.jsonl is written apart from the training data: no question of it is a training question, and
no text of it shares a long run of words with data/vet_qa.jsonl (the largest overlap is printed: `pytest -s`).
It covers what the gate is for, and data/README.md describes it as it is."""
from __future__ import annotations

import json
import re
from collections import Counter

from conftest import ROOT
from eval.eval_set import read_eval_set

TRAIN = ROOT / "data" / "vet_qa.jsonl"
EVAL = ROOT / "data" / "vet_eval.jsonl"
# Longest run of words an evaluation question may share with any training text, and any evaluation text
# (references included). Shared advice phrases are fine ("go to the nearest vet or emergency clinic now" is
# 9 words); shared wording of a question is not.
QUESTION_MAX = 7
ANY_TEXT_MAX = 9


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def training_texts() -> list[str]:
    rows = [json.loads(line) for line in TRAIN.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [m["content"] for row in rows for m in row["messages"]]


def longest_shared(text: str, index: dict[int, set[tuple[str, ...]]]) -> tuple[int, str]:
    """The longest run of consecutive words of `text` that also occurs in the indexed texts."""
    w, best = words(text), (0, "")
    for n in sorted(index):
        hit = next((w[i:i + n] for i in range(len(w) - n + 1) if tuple(w[i:i + n]) in index[n]), None)
        if hit is None:
            break
        best = (n, " ".join(hit))
    return best


def test_the_evaluation_set_does_not_overlap_the_training_set():
    texts = [words(t) for t in training_texts()]
    index = {n: {tuple(t[i:i + n]) for t in texts for i in range(len(t) - n + 1)} for n in range(1, ANY_TEXT_MAX + 2)}
    items = read_eval_set(EVAL)
    train_questions = {" ".join(t) for t in texts}
    worst_question, worst_text = (0, "", ""), (0, "", "")
    for item in items:
        for turn in item.messages:
            assert " ".join(words(turn["content"])) not in train_questions, item.id
            n, run = longest_shared(turn["content"], index)
            if turn["role"] == "user":
                worst_question = max(worst_question, (n, item.id, run))
            worst_text = max(worst_text, (n, item.id, run))
        worst_text = max(worst_text, (*longest_shared(item.reference, index)[:1], item.id,
                                      longest_shared(item.reference, index)[1]))
    print(f"\nlargest overlap with {TRAIN.name}: a question shares {worst_question[0]} consecutive words "
          f"({worst_question[1]}: \"{worst_question[2]}\"); any text {worst_text[0]} ({worst_text[1]}: "
          f"\"{worst_text[2]}\")")
    assert worst_question[0] <= QUESTION_MAX, worst_question
    assert worst_text[0] <= ANY_TEXT_MAX, worst_text


def test_the_evaluation_set_covers_what_the_gate_is_for():
    items = read_eval_set(EVAL)
    topics, species = Counter(i.topic for i in items), Counter(i.species for i in items)
    assert len(items) >= 60
    assert all(topics[t] >= 10 for t in ("emergencies", "toxins", "medicines", "everyday care")), topics
    assert len(species) >= 10
    assert sum(i.refer for i in items) >= 30 and sum(i.warn for i in items) >= 20
    assert sum(len(i.messages) > 1 for i in items) >= 3  # follow-up questions too
    assert all(i.forbid for i in items if i.warn)         # every danger has its endorsements forbidden


def test_readme_describes_the_evaluation_set():
    readme = (ROOT / "data" / "README.md").read_text()
    items = read_eval_set(EVAL)
    assert f"`vet_eval.jsonl` holds {len(items)} questions" in readme
    assert f"{sum(i.refer for i in items)} expect a referral" in readme
    assert f"{sum(i.warn for i in items)} expect a warning" in readme
