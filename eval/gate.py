"""The gate: a GGUF answers an evaluation set written apart from its training data (eval/eval_set.py) through
the chat's own engine, and every answer is checked (eval/answer_checks.py). Two ways of answering:

- `greedy`: temperature 0 and no repeat penalty, the model's own most likely answer;
- `chat`: the sampler the web chat uses by default (chat.engine.CHAT_SAMPLING, with the recipe's `chat:`
  settings over it) at a fixed seed, so the numbers are what a chat user meets, reproducibly.

`summarize` turns the graded answers into the gate's numbers: stop rate, referral rate where a referral is
expected, warning rate where a warning is expected, answers with a forbidden phrase, system-prompt echoes,
looping answers, answer length. `reference_perplexity` scores the set's reference answers."""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from pathlib import Path

from chat.engine import Sampling, chat_defaults

from eval.answer_checks import grade
from eval.eval_set import EvalItem
from eval.generation import MAX_TOKENS, generate

MODES = ("greedy", "chat")
# Answers decoded 8 at a time (chat.engine's continuous batching), as the chat decodes users who write together:
# the same answers on every run, ~2x faster than one at a time on 2 CPU cores. Not bit for bit a lone user's:
# a batch sums in another order, and where two tokens are nearly tied a greedy answer can take the other one
# (61 of 81 greedy answers of the quickstart's model were identical; stop, referral and warning rates moved by
# at most 3.7 points).
PARALLEL = 8


def sampling_for(mode: str, seed: int, chat: dict | None = None) -> Sampling:
    """`chat`: the recipe's own chat settings (`chat:`), over the web chat's defaults."""
    if mode == "greedy":
        return Sampling(temperature=0.0, repeat_penalty=1.0, seed=seed)
    if mode == "chat":
        return chat_defaults(chat, seed=seed)
    raise ValueError(f"unknown answering mode {mode!r}: use one of {', '.join(MODES)}")


def grade_answers(items: list[EvalItem], answers: list[dict], system_prompt: str | None) -> list[dict]:
    """One row per question: the answer as generated and every check of it."""
    rows = []
    for item, a in zip(items, answers, strict=True):
        rows.append({"id": item.id, "topic": item.topic, "species": item.species, "question": item.question,
                     "answer": a["answer"], "stopped": a["stopped"], "tokens": a["tokens"],
                     "refer_expected": item.refer, "warn_expected": item.warn,
                     **grade(a["answer"], item, system_prompt)})
    return rows


def relabel(result: dict, items: list[EvalItem]) -> dict:
    """A gate result whose answers carry the set's current `topic` and `species`: the labels are not part of
    what the answers were made from (eval_set_digest), so editing only them keeps the answers, not the old
    labels."""
    labels = {item.id: {"topic": item.topic, "species": item.species} for item in items}
    for mode in MODES:
        for answer in result.get(mode, {}).get("answers", []):
            answer.update(labels.get(answer.get("id"), {}))
    return result


def _rate(hits: int, total: int) -> float:
    return hits / total if total else math.nan


def summarize(rows: list[dict]) -> dict:
    """The gate's numbers for one model answering one way."""
    refer = [r for r in rows if r["refer_expected"]]
    warn = [r for r in rows if r["warn_expected"]]
    stopped = sum(r["stopped"] for r in rows)
    return {
        "questions": len(rows),
        "stopped": stopped, "stop_rate": _rate(stopped, len(rows)),
        "refer_expected": len(refer), "referred": sum(r["referred"] for r in refer),
        "referral_rate": _rate(sum(r["referred"] for r in refer), len(refer)),
        "warn_expected": len(warn), "warned": sum(r["warned"] for r in warn),
        "warning_rate": _rate(sum(r["warned"] for r in warn), len(warn)),
        "forbidden": sum(bool(r["forbidden"]) for r in rows),
        "forbidden_found": {r["id"]: r["forbidden"] for r in rows if r["forbidden"]},
        "echo": sum(r["echo"] for r in rows), "echo_ids": [r["id"] for r in rows if r["echo"]],
        "loops": sum(r["loop"] for r in rows), "loop_ids": [r["id"] for r in rows if r["loop"]],
        "repetition_mean": statistics.fmean(r["repetition"] for r in rows) if rows else math.nan,
        "words_median": statistics.median(r["words"] for r in rows) if rows else math.nan,
        "tokens_mean": statistics.fmean(r["tokens"] for r in rows) if rows else math.nan,
    }


def answer_set(gguf: Path, items: list[EvalItem], system_prompt: str | None, mode: str, seed: int = 0,
               max_tokens: int = MAX_TOKENS, log=print, parallel: int = PARALLEL, chat: dict | None = None) -> dict:
    """Every question of the set answered by the GGUF one way (`greedy` or `chat`, with the recipe's `chat`
    settings), graded and summarized."""
    sampling = sampling_for(mode, seed, chat)
    answers = generate(gguf, [item.conversation(system_prompt) for item in items], sampling, max_tokens, log=log,
                       what=f"evaluation questions ({mode})", parallel=parallel)
    rows = grade_answers(items, answers, system_prompt)
    sampling_used = {k: v for k, v in asdict(sampling).items() if k != "max_tokens"}
    return {"mode": mode, "sampling": sampling_used, "max_tokens": max_tokens, "summary": summarize(rows),
            "answers": rows}


def reference_perplexity(gguf: Path, samples: list[dict]) -> dict:
    """Perplexity of the GGUF on the reference answers (`samples`: token ids with only the reference scored)."""
    from eval.perplexity import evaluate_gguf

    result = evaluate_gguf(gguf, samples, progress=False)
    return {"ppl": result.ppl, "tokens": result.tokens}
