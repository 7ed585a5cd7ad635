"""After the export: does the served model behave? Measured on the GGUF the chat serves, saved in quality.json.

1. Quantization: perplexity of the GGUF (llama.cpp) beside the merged model's (torch, float32) on the last
   stage's validation set, and the relative difference (flagged over QUANT_TOLERANCE).
2. Generation: held-out questions (the first user turn of up to 40 validation conversations) answered by
   the GGUF through the chat's own engine (eval/generation.py), greedy, at most 256 tokens.

quality.json is made again exactly when the GGUF or the validation set changed (runner/run_dir.py's rule).
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


def quantization_check(merged: Path, gguf: Path, val: list[dict]) -> dict:
    """Validation perplexity of the merged model (torch, float32) and of the GGUF (llama.cpp)."""
    import torch
    from transformers import AutoModelForCausalLM

    from eval.perplexity import evaluate_gguf, evaluate_torch

    from ..model.fast_head import add_fast_lm_head

    with progress("quality: perplexity", 2 * len(val), "examples") as bar:
        bar.update(status="the merged model (torch)")
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        add_fast_lm_head(model)
        torch_result = evaluate_torch(model, val, batch_size=4, progress=bar.callback(span=len(val)))
        del model
        gc.collect()
        bar.update(status="the GGUF (llama.cpp)")
        gguf_result = evaluate_gguf(gguf, val, progress=bar.callback(offset=len(val), span=len(val)))
    diff = (gguf_result.ppl - torch_result.ppl) / torch_result.ppl
    return {"merged_ppl": torch_result.ppl, "gguf_ppl": gguf_result.ppl, "relative": diff,
            "tokens": torch_result.tokens, "gguf_tokens": gguf_result.tokens,
            "within_tolerance": abs(diff) <= QUANT_TOLERANCE, "tolerance": QUANT_TOLERANCE}


def check_export(run: RunDir, gguf: Path, stage_name: str, val: list[dict], tokenizer,
                 system_prompt: str | None, log=print) -> dict:
    """The quantization and generation checks on `gguf`; the saved ones when they are up to date."""
    inputs = {"gguf": [gguf.name, file_identity(gguf)], "merged": run.made_from(run.merged),
              "val": samples_digest(val), "system_prompt": system_prompt}
    if run.fresh(run.quality_file, inputs):
        log("quality checks are up to date (quality.json)")
        return json.loads(run.quality_file.read_text())
    with run.making(run.quality_file, inputs):
        start = time.perf_counter()
        log(f"quality: perplexity of the merged model and the GGUF on the {stage_name} validation set")
        quant = quantization_check(run.merged, gguf, val)
        questions = held_out_questions(val, tokenizer, system_prompt)
        log(f"quality: answering {len(questions)} held-out {stage_name} questions with the GGUF (greedy, "
            f"at most {MAX_TOKENS} tokens)")
        with progress("quality: answering", len(questions), "questions") as bar:
            generation = answer_questions(gguf, questions, log=log, progress=lambda done, total: bar.update(done))
        result = {"gguf": gguf.name, "stage": stage_name, "val_examples": len(val), "quantization": quant,
                  "generation": generation, "seconds": round(time.perf_counter() - start, 1)}
        atomic.write_text(run.quality_file, json.dumps(result, indent=2) + "\n")
    return result
