"""The model as it stood after one stage (or the base model) as a GGUF, with the recipe's chat template inside,
so the evaluation gate can answer with it exactly as it answers with the served model. The file is only for
measuring: it lives in the run's gate folder while it is used and is removed afterwards."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import TunebookError
from ..recipe import Recipe
from ..run_dir import RunDir
from .merge import merge_adapters
from .to_gguf import export_quants, write_type

BASE = "base"


def stage_adapters(recipe: Recipe, run: RunDir, model: str) -> tuple[list[Path], Path]:
    """(adapters to merge into the base, in order; the adapter folder whose tokenizer and template to use) for
    the model after stage `model`, or for the base model (`base`: no adapter, the first stage's template)."""
    name = recipe.stages[0].name if model == BASE else model
    outcome = run.stage(name).outcome()
    if outcome is None or not outcome.done or outcome.adapter is None:
        raise TunebookError(f"stage {name} of {run} has not finished: there is no model after it to measure\n"
                            f"    fix: finish training first (tunebook train {run.recipe_file})")
    if model == BASE:
        return [], Path(outcome.adapter)
    return [Path(p) for p in outcome.lineage] + [Path(outcome.adapter)], Path(outcome.adapter)


@contextmanager
def stage_gguf(recipe: Recipe, run: RunDir, model: str, log=print) -> Iterator[Path]:
    """Write the GGUF of the model after stage `model` (or `base`) in the served type (the export's first, with
    its per-tensor precision), yield its path, and remove it (and its merged weights) afterwards."""
    quant = export_quants(recipe)[0]
    adapters, tokenizer_from = stage_adapters(recipe, run, model)
    merged, out = run.gate_merged(model), run.gate_gguf(model, quant)
    try:
        merge_adapters(recipe, adapters, tokenizer_from, merged, log)
        log(f"the {'base model' if model == BASE else f'model after {model}'} as {quant}, only for the evaluation "
            "gate (removed afterwards)")
        write_type(recipe, merged, out, quant, run.gate_quantize_source(model), log)
        shutil.rmtree(merged, ignore_errors=True)
        yield out
    finally:
        shutil.rmtree(merged, ignore_errors=True)
        out.unlink(missing_ok=True)
