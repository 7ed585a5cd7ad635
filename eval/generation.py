"""Generation checks of a GGUF as the chat serves it: held-out questions answered through chat/engine.py
(the chat app's own engine, so the numbers are what a user of the chat meets), with whether each answer
stopped at end-of-turn, first-token latency and generation speed."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

from eval.labels import IGNORE_INDEX

QUESTIONS = 40
MAX_TOKENS = 256


def held_out_questions(val: list[dict], tokenizer, system_prompt: str | None, n: int = QUESTIONS) -> list[dict]:
    """{"messages", "prompt_ids", "reference"} for the first user turn of up to n validation examples.

    The question text is read back from the training tokens: the prompt (everything before the first trained
    token) decoded, minus what the chat template writes around a user message."""
    marker = "\x00QUESTION\x00"
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    frame = tokenizer.apply_chat_template(head + [{"role": "user", "content": marker}], tokenize=False,
                                          add_generation_prompt=True)
    prefix, suffix = frame.split(marker)
    out = []
    for ex in val:
        labels = ex["labels"]
        first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
        if first is None:
            continue
        text = tokenizer.decode(ex["input_ids"][:first], skip_special_tokens=False)
        if not (text.startswith(prefix) and text.endswith(suffix)):
            continue  # a later turn, or a template this reading does not understand
        end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        out.append({"messages": head + [{"role": "user", "content": text[len(prefix):len(text) - len(suffix)]}],
                    "prompt_ids": list(ex["input_ids"][:first]),
                    "reference": tokenizer.decode(ex["input_ids"][first:end], skip_special_tokens=True).strip()})
        if len(out) == n:
            break
    return out


def generate(gguf: Path, conversations: list[list[dict]], sampling=None, max_tokens: int = MAX_TOKENS, log=print,
             what: str = "questions", progress=None, parallel: int = 1) -> list[dict]:
    """Answer each conversation with the GGUF through ChatEngine (greedy unless `sampling`, a chat.engine
    Sampling, says otherwise): per answer its text, whether it stopped at end-of-turn, the tokens it drew,
    timings and the prompt's token ids. `progress(done, total)`, when given, is told after each answer (instead
    of a log line every ten).

    `parallel` 1 answers one at a time, as a lone user gets it: the timings are a user's. More decodes that
    many answers together, as the chat does for users who write at the same time: more throughput, the same
    answers on every call (all are queued at once), but timings that are shared, and answers that can differ
    from a lone user's where two tokens are nearly tied (eval.gate.PARALLEL)."""
    from chat.engine import ChatEngine, Sampling

    engine = ChatEngine(gguf, n_ctx=1024, parallel=max(1, min(parallel, len(conversations) or 1)))
    sampling = sampling or Sampling(temperature=0.0, seed=0)
    sampling = replace(sampling, max_tokens=max_tokens)
    rows = []
    try:
        prompts = [engine.prepare(messages, max_tokens) for messages in conversations]
        start = time.perf_counter()
        together = engine.start_all(prompts, sampling) if engine.parallel > 1 else None
        for i, prompt in enumerate(prompts):
            if together is None:
                start = time.perf_counter()
            generation = together[i] if together is not None else engine.start(prompt, sampling)
            first, pieces = None, []
            for piece in generation:
                first = first if first is not None else time.perf_counter() - start
                pieces.append(piece)
            seconds = time.perf_counter() - start
            rows.append({"answer": "".join(pieces).strip(), "stopped": generation.finish_reason == "stop",
                         "tokens": len(generation.tokens),
                         "first_token_s": round(first if first is not None else seconds, 3),
                         "seconds": round(seconds, 3), "prompt_ids": prompt.tokens})
            if progress is not None:
                progress(i + 1, len(conversations))
            elif (i + 1) % 10 == 0:
                log(f"answered {i + 1}/{len(conversations)} {what}")
    finally:
        engine.close()
    return rows


def speed(rows: list[dict]) -> dict:
    """First-token latency (median, max) and generation speed after the first token."""
    latencies = [r["first_token_s"] for r in rows]
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] - r["first_token_s"] for r in rows)
    return {"first_token_s_median": statistics.median(latencies) if rows else math.nan,
            "first_token_s_max": max(latencies, default=math.nan),
            "tokens_per_s": tokens / seconds if seconds > 0 else math.nan}


def answer_questions(gguf: Path, questions: list[dict], max_tokens: int = MAX_TOKENS, log=print,
                     progress=None) -> dict:
    """Answer each held-out question with the GGUF through ChatEngine (greedy); whether it stopped at end-of-turn.
    `progress(done, total)`, when given, is told after each answer (instead of a log line every ten)."""
    answered = generate(gguf, [q["messages"] for q in questions], max_tokens=max_tokens, log=log,
                        what="held-out questions", progress=progress)
    rows = []
    for q, a in zip(questions, answered):
        rows.append({"question": q["messages"][-1]["content"], "answer": a["answer"], "reference": q["reference"],
                     "stopped": a["stopped"], "tokens": a["tokens"], "first_token_s": a["first_token_s"],
                     "seconds": a["seconds"], "same_prompt_as_training": a["prompt_ids"] == q["prompt_ids"]})
    return {"questions": len(rows), "stopped": sum(r["stopped"] for r in rows),
            "stop_rate": sum(r["stopped"] for r in rows) / len(rows) if rows else math.nan,
            "max_tokens": max_tokens, **speed(rows),
            "same_prompt_as_training": sum(r["same_prompt_as_training"] for r in rows), "answers": rows}
