"""The forgetting matrix of a multi-stage run: every stage's validation set scored with the base model
and after every stage, so "stage 2 did not forget stage 1" is a number (eval/report.py renders it)."""
from __future__ import annotations

import gc
import json
from pathlib import Path

from eval.perplexity import evaluate_torch

from . import atomic
from .recipe import Recipe
from .train import StageOutcome


def stage_model(model_ref: str, recipe: Recipe, dtype, outcome: StageOutcome | None):
    """The model as it stood after a stage (base + merged lineage + adapter); the base when None."""
    from peft import PeftModel

    from .model import load_base

    model = load_base(model_ref, recipe.model, dtype)
    if outcome is None:
        return model
    for adapter in outcome.lineage:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return PeftModel.from_pretrained(model, outcome.adapter)


def forgetting_matrix(recipe: Recipe, run_dir: Path, model_ref: str, dtype, val_sets: dict[str, list[dict]],
                      pad_id: int | None, batch_size: int = 4, log=print) -> dict:
    """{"stages": [...], "rows": ["base", ...], "ppl": {row: {stage: ppl}}, "loss": {...}}; saved as forgetting.json."""
    stages = [s.name for s in recipe.stages if val_sets.get(s.name)]
    outcomes = {s.name: StageOutcome.load(run_dir / s.name) for s in recipe.stages}
    rows = ["base"] + [s.name for s in recipe.stages if outcomes[s.name] and outcomes[s.name].status == "done"]
    result = {"stages": stages, "rows": rows, "ppl": {}, "loss": {}, "tokens": {}}
    for row in rows:
        log(f"forgetting matrix: scoring {'the base model' if row == 'base' else 'after stage ' + row}")
        model = stage_model(model_ref, recipe, dtype, None if row == "base" else outcomes[row])
        result["ppl"][row], result["loss"][row] = {}, {}
        for stage in stages:
            scored = evaluate_torch(model, val_sets[stage], batch_size=batch_size, progress=False, pad_id=pad_id)
            result["ppl"][row][stage] = scored.ppl
            result["loss"][row][stage] = scored.loss
            result["tokens"][stage] = scored.tokens
        del model
        gc.collect()
    atomic.write_text(run_dir / "forgetting.json", json.dumps(result, indent=2) + "\n")
    return result
