"""The forgetting matrix of a multi-stage run: every validation set scored with the base model and after every
stage, so "stage 2 did not forget stage 1" is a number (eval/report.py renders it). Columns are validation
sets: one per stage, or one per source for a stage whose sources each keep a validation set
(StageConfig.val_columns names them).

A row is the model after one stage version (its fingerprint), a column one validation set: when a rerun changes
only the last stage, only its row is scored again; the other cells are taken from the matrix made before."""
from __future__ import annotations

import gc
import hashlib
import json

from eval.perplexity import evaluate_torch

from .. import atomic
from ..console import progress
from ..model.load import load_base, resolve_dtype
from ..recipe import Recipe
from ..run_dir import RunDir, StageOutcome


def stage_model(model_ref: str, recipe: Recipe, dtype, outcome: StageOutcome | None):
    """The model as it stood after a stage (base + merged lineage + adapter); the base when None."""
    from peft import PeftModel

    model = load_base(model_ref, recipe.model, dtype)
    if outcome is None:
        return model
    for adapter in outcome.lineage:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return PeftModel.from_pretrained(model, outcome.adapter)


def samples_digest(samples: list[dict]) -> str:
    """Identity of a tokenized validation set: its token ids and labels."""
    text = json.dumps([[s["input_ids"], s["labels"]] for s in samples], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def column_stages(recipe: Recipe) -> dict[str, str]:
    """{validation column: the stage it belongs to}, in stage order."""
    return {column: stage.name for stage in recipe.stages for column in stage.val_columns().values()}


def forgetting_matrix(recipe: Recipe, run: RunDir, model_ref: str, val_sets: dict[str, list[dict]],
                      pad_id: int | None, batch_size: int = 4, log=print) -> dict:
    """{"stages": [column, ...], "column_stage": {column: stage}, "rows": ["base", stage, ...],
    "ppl": {row: {column: ppl}}, "loss": {...}}; val_sets: {column: samples}. Saved as forgetting.json, and
    made again only when a stage, a validation set or the base changed."""
    dtype = resolve_dtype(recipe.model)
    stages = [column for column in column_stages(recipe) if val_sets.get(column)]
    outcomes = {s.name: run.stage(s.name).outcome() for s in recipe.stages}
    rows = ["base"] + [s.name for s in recipe.stages if outcomes[s.name] and outcomes[s.name].done]
    inputs = {"base": recipe.model.base, "dtype": str(dtype), "pad_id": pad_id,
              "after": {row: run.stage(row).identity() for row in rows[1:]},
              "val": {stage: samples_digest(val_sets[stage]) for stage in stages}}
    if run.fresh(run.forgetting_file, inputs):
        log(f"forgetting matrix is up to date: {run.forgetting_file}")
        return json.loads(run.forgetting_file.read_text())
    kept = reusable_cells(run, inputs)
    result = {"stages": stages, "column_stage": {c: column_stages(recipe)[c] for c in stages}, "rows": rows,
              "ppl": {}, "loss": {}, "tokens": {}}
    todo_total = sum(len(val_sets[stage]) for row in rows for stage in stages if (row, stage) not in kept)
    log(f"forgetting matrix: {len(stages)} validation set(s) scored with {len(rows)} models "
        f"({', '.join(rows)})")
    with run.making(run.forgetting_file, inputs), progress("forgetting matrix", todo_total, "examples") as bar:
        done = 0
        for row in rows:
            result["ppl"][row], result["loss"][row] = {}, {}
            todo = [stage for stage in stages if (row, stage) not in kept]
            for stage in stages:
                if (row, stage) in kept:
                    result["ppl"][row][stage], result["loss"][row][stage], result["tokens"][stage] = kept[row, stage]
            if not todo:
                log(f"forgetting matrix: {'the base model' if row == 'base' else 'after stage ' + row} is unchanged")
                continue
            bar.update(status=f"loading {'the base model' if row == 'base' else 'the model after ' + row}")
            model = stage_model(model_ref, recipe, dtype, None if row == "base" else outcomes[row])
            for stage in todo:
                bar.update(status=f"{row}: scoring {stage}")
                scored = evaluate_torch(model, val_sets[stage], batch_size=batch_size, pad_id=pad_id,
                                        progress=bar.callback(offset=done, span=len(val_sets[stage])))
                done += len(val_sets[stage])
                result["ppl"][row][stage] = scored.ppl
                result["loss"][row][stage] = scored.loss
                result["tokens"][stage] = scored.tokens
            del model
            gc.collect()
        atomic.write_text(run.forgetting_file, json.dumps(result, indent=2) + "\n")
    return result


def reusable_cells(run: RunDir, inputs: dict) -> dict[tuple[str, str], tuple[float, float, int]]:
    """{(row, stage): (ppl, loss, tokens)} of the matrix on disk whose row is the same model (the base, or the same
    stage version) and whose column the same validation set; nothing when base, dtype or padding changed."""
    before = run.made_from(run.forgetting_file)
    if before is None or not run.forgetting_file.is_file():
        return {}
    if any(before.get(k) != inputs[k] for k in ("base", "dtype", "pad_id")):
        return {}
    old = json.loads(run.forgetting_file.read_text())
    same_rows = ["base"] + [r for r, identity in inputs["after"].items() if before.get("after", {}).get(r) == identity]
    same_stages = [s for s, digest in inputs["val"].items() if before.get("val", {}).get(s) == digest]
    return {(row, stage): (old["ppl"][row][stage], old["loss"][row][stage], old["tokens"][stage])
            for row in same_rows if row in old.get("ppl", {}) for stage in same_stages if stage in old["ppl"][row]}
