"""After the export: does the served model behave? Numbers for report.md, measured on the GGUF the chat serves.

1. Quantization: perplexity of the GGUF (llama.cpp) beside the merged model's (torch, float32) on the last
   stage's validation set, and the relative difference (flagged over 1%).
2. Generation: held-out questions (the first user turn of up to 40 validation conversations) answered by
   the GGUF through chat/engine.py as the chat app runs it, greedy, at most 256 tokens: how many answers
   stop at end-of-turn, first-token latency, and a few questions with their answers.
3. The quickstart's bar (README, Quickstart) checked against those numbers, the forgetting matrix and the run time.

Results are saved in quality.json with the size and mtime of the GGUF they were measured on, so a rerun
of a finished run reuses them.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from . import atomic

IGNORE = -100
QUESTIONS = 40
MAX_TOKENS = 256
SAMPLES_SHOWN = 5
QUANT_TOLERANCE = 0.01
# the offline quickstart's bar (README, Quickstart): what a two-stage run on CPU should reach
TARGETS = {"first_stage_beats_base": True, "last_stage_gain": 0.25, "forgetting": 0.05, "stop_rate": 0.95,
           "first_token_s": 2.0, "wall_minutes": 20.0}


def gguf_key(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"file": gguf.name, "size": stat.st_size, "mtime": stat.st_mtime}


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
        first = next((i for i, t in enumerate(labels) if t != IGNORE), None)
        if first is None:
            continue
        text = tokenizer.decode(ex["input_ids"][:first], skip_special_tokens=False)
        if not (text.startswith(prefix) and text.endswith(suffix)):
            continue  # a later turn, or a template this reading does not understand
        end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE), len(labels))
        out.append({"messages": head + [{"role": "user", "content": text[len(prefix):len(text) - len(suffix)]}],
                    "prompt_ids": list(ex["input_ids"][:first]),
                    "reference": tokenizer.decode(ex["input_ids"][first:end], skip_special_tokens=True).strip()})
        if len(out) == n:
            break
    return out


class _Tap:
    """Stands in for the engine's llama.cpp model and remembers the tokens generation drew."""

    def __init__(self, llm):
        self._llm, self.drawn = llm, []

    def generate(self, *args, **kwargs):
        self.drawn = []
        for token in self._llm.generate(*args, **kwargs):
            self.drawn.append(token)
            yield token

    def __getattr__(self, name):
        return getattr(self._llm, name)


def answer_questions(gguf: Path, questions: list[dict], max_tokens: int = MAX_TOKENS, log=print) -> dict:
    """Answer each question with the GGUF through ChatEngine (greedy); whether it stopped at end-of-turn."""
    from chat.engine import ChatEngine, Sampling

    engine = ChatEngine(gguf, n_ctx=1024)
    tap = engine.llm = _Tap(engine.llm)
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, seed=0)
    rows = []
    try:
        for i, q in enumerate(questions):
            prompt = engine.prepare(q["messages"], max_tokens)
            start = time.perf_counter()
            first, pieces = None, []
            for piece in engine.stream(prompt, sampling):
                first = first if first is not None else time.perf_counter() - start
                pieces.append(piece)
            seconds = time.perf_counter() - start
            last = tap.drawn[-1] if tap.drawn else None
            ended = last is not None and (last in engine.stop_ids or engine._is_end(last))
            generated = len(tap.drawn) - (1 if ended else 0)
            # the engine stops early only at end-of-turn (a token, or its text)
            stopped = ended or generated < prompt.max_tokens
            rows.append({"question": q["messages"][-1]["content"], "answer": "".join(pieces).strip(),
                         "reference": q["reference"], "stopped": stopped, "tokens": generated,
                         "first_token_s": round(first if first is not None else seconds, 3),
                         "seconds": round(seconds, 3), "same_prompt_as_training": prompt.tokens == q["prompt_ids"]})
            if (i + 1) % 10 == 0:
                log(f"quality: answered {i + 1}/{len(questions)} held-out questions")
    finally:
        engine.close()
    latencies = [r["first_token_s"] for r in rows]
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] - r["first_token_s"] for r in rows)
    return {"questions": len(rows), "stopped": sum(r["stopped"] for r in rows),
            "stop_rate": sum(r["stopped"] for r in rows) / len(rows) if rows else math.nan,
            "max_tokens": max_tokens, "first_token_s_median": statistics.median(latencies) if rows else math.nan,
            "first_token_s_max": max(latencies, default=math.nan),
            "tokens_per_s": tokens / seconds if seconds > 0 else math.nan,
            "same_prompt_as_training": sum(r["same_prompt_as_training"] for r in rows), "answers": rows}


def quantization_check(merged: Path, gguf: Path, val: list[dict]) -> dict:
    """Validation perplexity of the merged model (torch, float32) and of the GGUF (llama.cpp)."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from eval.perplexity import evaluate_gguf, evaluate_torch

    from .fast_head import add_fast_lm_head

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    add_fast_lm_head(model)
    torch_result = evaluate_torch(model, val, batch_size=4, progress=False)
    del model
    gc.collect()
    gguf_result = evaluate_gguf(gguf, val, progress=False)
    diff = (gguf_result.ppl - torch_result.ppl) / torch_result.ppl
    return {"merged_ppl": torch_result.ppl, "gguf_ppl": gguf_result.ppl, "relative": diff,
            "tokens": torch_result.tokens, "gguf_tokens": gguf_result.tokens,
            "within_tolerance": abs(diff) <= QUANT_TOLERANCE, "tolerance": QUANT_TOLERANCE}


def check_export(run_dir: Path, gguf: Path, stage_name: str, val: list[dict], tokenizer,
                 system_prompt: str | None, log=print) -> dict:
    """The quantization and generation checks on `gguf` (from quality.json when it is the same file)."""
    path = run_dir / "quality.json"
    key = gguf_key(gguf)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("gguf") == key:
            log("quality checks are up to date (quality.json)")
            return saved
    start = time.perf_counter()
    log(f"quality: perplexity of the merged model and the GGUF on the {stage_name} validation set")
    quant = quantization_check(run_dir / "merged", gguf, val)
    questions = held_out_questions(val, tokenizer, system_prompt)
    log(f"quality: answering {len(questions)} held-out {stage_name} questions with the GGUF (greedy, "
        f"at most {MAX_TOKENS} tokens)")
    generation = answer_questions(gguf, questions, log=log)
    result = {"gguf": key, "stage": stage_name, "val_examples": len(val), "quantization": quant,
              "generation": generation, "seconds": round(time.perf_counter() - start, 1)}
    atomic.write_text(path, json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# report.md sections


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def quantization_section(q: dict, stage: str) -> str:
    flag = "" if q["within_tolerance"] else f" **over the {q['tolerance'] * 100:.0f}% tolerance**"
    return (f"| model | {stage} validation perplexity |\n|---|---|\n| merged (torch, float32) | "
            f"{q['merged_ppl']:.4f} |\n| GGUF (llama.cpp) | {q['gguf_ppl']:.4f} |\n\n"
            f"GGUF vs merged: {_pct(q['relative'])}{flag} ({q['tokens']:,} scored tokens).")


def generation_section(g: dict, stage: str, val_examples: int) -> str:
    fewer = (f" The {stage} validation set has {val_examples} conversations, fewer than {QUESTIONS}: all "
             f"{g['questions']} usable first questions were asked." if g["questions"] < QUESTIONS else "")
    lines = [f"{g['questions']} held-out {stage} questions (first user turn of validation conversations), "
             f"answered by the GGUF through the chat engine, greedy, at most {g['max_tokens']} tokens.{fewer}", "",
             f"- stopped at end-of-turn: **{g['stopped']}/{g['questions']} ({g['stop_rate'] * 100:.1f}%)**",
             f"- first streamed token: median {g['first_token_s_median']:.2f} s, max {g['first_token_s_max']:.2f} s",
             f"- generation: {g['tokens_per_s']:.1f} tokens/s",
             f"- prompt tokens identical to training's: {g['same_prompt_as_training']}/{g['questions']}", ""]
    for row in g["answers"][:SAMPLES_SHOWN]:
        answer = row["answer"] if len(row["answer"]) <= 700 else row["answer"][:700] + " …"
        lines += [f"**Q:** {row['question']}", "", f"**A** ({row['tokens']} tokens"
                  f"{'' if row['stopped'] else ', did not stop'}): {answer}", ""]
    return "\n".join(lines).rstrip()


def targets_section(forgetting: dict | None, quality: dict | None, wall_s: float | None) -> str:
    """Issue 9's numbers, each with what was measured and whether it is met."""
    rows = []

    def add(what, measured, ok):
        rows.append(f"| {what} | {measured} | {'yes' if ok else '**no**'} |")

    if forgetting and len(forgetting["rows"]) >= 3:
        ppl, stages = forgetting["ppl"], forgetting["stages"]
        first, last = stages[0], stages[-1]
        before = forgetting["rows"][-2]
        base_first, after_first = ppl["base"][first], ppl[first][first]
        add(f"stage {first} lowers {first} val ppl below the base model's", f"{base_first:.3f} → {after_first:.3f}",
            after_first < base_first)
        gain = (ppl[before][last] - ppl[last][last]) / ppl[before][last]
        add(f"stage {last} lowers {last} val ppl by ≥ {TARGETS['last_stage_gain'] * 100:.0f}% vs after {before}",
            f"{ppl[before][last]:.3f} → {ppl[last][last]:.3f} ({-gain * 100:+.1f}%)", gain >= TARGETS["last_stage_gain"])
        for stage in stages[:-1]:
            rise = (ppl[last][stage] - ppl[stage][stage]) / ppl[stage][stage]
            add(f"{stage} val ppl after {last} rises ≤ {TARGETS['forgetting'] * 100:.0f}% over after {stage}",
                f"{ppl[stage][stage]:.3f} → {ppl[last][stage]:.3f} ({rise * 100:+.1f}%)", rise <= TARGETS["forgetting"])
    if quality:
        q, g = quality["quantization"], quality["generation"]
        add(f"Q8_0 GGUF ppl within {q['tolerance'] * 100:.0f}% of merged ({quality['stage']} val)",
            f"{q['gguf_ppl']:.4f} vs {q['merged_ppl']:.4f} ({_pct(q['relative'])})", q["within_tolerance"])
        add(f"held-out answers stop at end-of-turn within {g['max_tokens']} tokens (≥ {TARGETS['stop_rate'] * 100:.0f}%)",
            f"{g['stopped']}/{g['questions']} ({g['stop_rate'] * 100:.1f}%)", g["stop_rate"] >= TARGETS["stop_rate"])
        add(f"first streamed token ≤ {TARGETS['first_token_s']:.0f} s (chat engine, this machine)",
            f"median {g['first_token_s_median']:.2f} s, max {g['first_token_s_max']:.2f} s",
            g["first_token_s_max"] <= TARGETS["first_token_s"])
    if wall_s is not None:
        add(f"whole run ≤ {TARGETS['wall_minutes']:.0f} min wall", f"{wall_s / 60:.1f} min",
            wall_s / 60 <= TARGETS["wall_minutes"])
    if not rows:
        return ""
    return "| target | measured | met |\n|---|---|---|\n" + "\n".join(rows)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_time_section(recipe, run_dir: Path, wall_s: float | None, quality: dict | None) -> str:
    parts = []
    for stage in recipe.stages:
        outcome = _read(run_dir / stage.name / "stage.json")
        if outcome:
            parts.append(f"stage {stage.name} {outcome['seconds'] / 60:.1f} min ({outcome['steps']} steps)")
    if quality:
        parts.append(f"quality checks {quality['seconds'] / 60:.1f} min")
    text = "Training and checks: " + ", ".join(parts) + "." if parts else ""
    if wall_s is not None:
        text = (f"Wall time of the command that trained every stage: **{wall_s / 60:.1f} min** (data, model loads, "
                f"training with evaluations, forgetting matrix, merge, GGUF export and verification, checks). " + text)
    return text


def report_sections(recipe, run_dir: Path) -> dict[str, str]:
    """Extra report.md sections from forgetting.json, quality.json, wall.json and the stages' stage.json."""
    forgetting, quality = _read(run_dir / "forgetting.json"), _read(run_dir / "quality.json")
    wall = _read(run_dir / "wall.json")
    wall_s = wall["wall_s"] if wall else None
    sections = {}
    targets = targets_section(forgetting, quality, wall_s)
    if targets:
        sections["Targets"] = targets
    run_time = run_time_section(recipe, run_dir, wall_s, quality)
    if run_time:
        sections["Run time"] = run_time
    if quality:
        sections["Quantization check"] = quantization_section(quality["quantization"], quality["stage"])
        sections["Sample answers"] = generation_section(quality["generation"], quality["stage"],
                                                        quality["val_examples"])
    return sections
