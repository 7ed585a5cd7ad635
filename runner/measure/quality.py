"""After the export: does the served model behave? Measured on the GGUF the chat serves, saved in quality.json,
and on every other exported type, saved in quality-<quant>.json, so report.md can table size against quality.

1. Quantization: perplexity of the GGUF (llama.cpp) beside the merged model's (torch, float32) on the last
   stage's validation set, and the relative difference (flagged over the type's PPL_TOLERANCE).
2. Generation: held-out questions (the first user turn of up to 40 validation conversations) answered by
   the GGUF through the chat's own engine (eval/generation.py), greedy, at most 256 tokens.

Each file is made again exactly when its GGUF or the validation set changed (runner/run_dir.py's rule).
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from eval.generation import MAX_TOKENS, answer_questions, held_out_questions

from .. import atomic
from ..console import progress
from ..run_dir import RunDir, file_identity
from .forgetting import samples_digest

QUANT_TOLERANCE = 0.01
# GGUF perplexity over the merged model's that a type is expected to stay within, from the quickstart's
# measurements (README, "GGUF types"); a file over its line is flagged in report.md
PPL_TOLERANCE = {"f32": 0.001, "bf16": 0.005, "f16": 0.005, "q8_0": QUANT_TOLERANCE, "q6_k": 0.02, "q5_k_m": 0.03,
                 "q5_k_s": 0.03, "q5_0": 0.03, "q4_k_m": 0.06, "q4_k_s": 0.06, "q4_0": 0.08, "iq4_xs": 0.06,
                 "iq4_nl": 0.06, "q3_k_m": 0.15}


def merged_perplexity(merged: Path, val: list[dict]):
    """Validation perplexity of the merged model (torch, float32): the reference every GGUF is held to."""
    import torch
    from transformers import AutoModelForCausalLM

    from eval.perplexity import evaluate_torch

    from ..model.fast_head import add_fast_lm_head

    with progress("quality: perplexity of the merged model", len(val), "examples") as bar:
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        add_fast_lm_head(model)
        result = evaluate_torch(model, val, batch_size=4, progress=bar.callback(span=len(val)))
    del model
    gc.collect()
    return result


def quantization_check(merged: Path, gguf: Path, val: list[dict], tolerance: float = QUANT_TOLERANCE,
                       reference=None) -> dict:
    """Validation perplexity of the merged model (`reference`, or computed here) and of the GGUF (llama.cpp)."""
    from eval.perplexity import evaluate_gguf

    torch_result = reference or merged_perplexity(merged, val)
    with progress(f"quality: perplexity of {gguf.name}", len(val), "examples") as bar:
        gguf_result = evaluate_gguf(gguf, val, progress=bar.callback(span=len(val)))
    diff = (gguf_result.ppl - torch_result.ppl) / torch_result.ppl
    return {"merged_ppl": torch_result.ppl, "gguf_ppl": gguf_result.ppl, "relative": diff,
            "tokens": torch_result.tokens, "gguf_tokens": gguf_result.tokens,
            "within_tolerance": abs(diff) <= tolerance, "tolerance": tolerance}


def check_exports(run: RunDir, ggufs: dict[str, Path], stage_name: str, val: list[dict], tokenizer,
                  system_prompt: str | None, log=print) -> dict[str, dict]:
    """`check_export` on every exported type ({type: GGUF}, the served one first: quality.json; the others:
    quality-<type>.json). The merged model's perplexity is computed once, and only if a check is redone."""
    reference: list = []

    def merged_ppl():
        if not reference:
            reference.append(merged_perplexity(run.merged, val))
        return reference[0]

    return {quant: check_export(run, gguf, stage_name, val, tokenizer, system_prompt, log,
                                quant=quant, out=run.quality_of(None if i == 0 else quant), reference=merged_ppl)
            for i, (quant, gguf) in enumerate(ggufs.items())}


def check_export(run: RunDir, gguf: Path, stage_name: str, val: list[dict], tokenizer,
                 system_prompt: str | None, log=print, quant: str | None = None, out: Path | None = None,
                 reference=None) -> dict:
    """The quantization and generation checks on `gguf` (of type `quant`), saved in `out` (quality.json);
    the saved ones when they are up to date. `reference`: gives the merged model's perplexity."""
    out = out or run.quality_file
    inputs = {"gguf": [gguf.name, file_identity(gguf)], "merged": run.made_from(run.merged),
              "val": samples_digest(val), "system_prompt": system_prompt}
    if run.fresh(out, inputs):
        log(f"quality checks are up to date ({out.name})")
        return json.loads(out.read_text())
    with run.making(out, inputs):
        start = time.perf_counter()
        log(f"quality: perplexity of the merged model and {gguf.name} on the {stage_name} validation set")
        quantization = quantization_check(run.merged, gguf, val, PPL_TOLERANCE.get(quant, QUANT_TOLERANCE),
                                          reference() if reference else None)
        questions = held_out_questions(val, tokenizer, system_prompt)
        log(f"quality: answering {len(questions)} held-out {stage_name} questions with the GGUF (greedy, "
            f"at most {MAX_TOKENS} tokens)")
        with progress("quality: answering", len(questions), "questions") as bar:
            generation = answer_questions(gguf, questions, log=log, progress=lambda done, total: bar.update(done))
        result = {"gguf": gguf.name, "type": quant, "stage": stage_name, "val_examples": len(val),
                  "quantization": quantization,
                  "generation": generation, "seconds": round(time.perf_counter() - start, 1)}
        atomic.write_text(out, json.dumps(result, indent=2) + "\n")
    return result
