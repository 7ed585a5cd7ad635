"""`tunebook eval`: the project's one perplexity for any target — a run, an adapter, a model folder or a
GGUF — on a stage's validation set (or one of a stage's several: `--stage <stage>/<source>`) or on a whole
data source, scored on the same tokens as in training (same chat template, same assistant-only mask)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from eval.perplexity import EvalResult, evaluate_gguf, evaluate_torch

from ..errors import TunebookError
from ..recipe import Recipe, load_recipe
from ..run_dir import RunDir


def _kind(target: Path) -> str:
    if target.is_file() and target.suffix == ".gguf":
        return "gguf"
    if RunDir(target).is_run():
        return "run"
    if (target / "adapter_config.json").is_file():
        return "adapter"
    if (target / "config.json").is_file():
        return "model"
    raise TunebookError(f"{target}: not a run directory, adapter, model folder or .gguf file\n"
                        "    fix: pass a run directory, a stage's adapter folder, the merged folder or a .gguf file")


def tokenizer_dir(target: Path, kind: str) -> Path | None:
    """Where the tokenizer (with the training chat template) of a target lives."""
    if kind in ("adapter", "model"):
        return target
    if kind == "run":
        run = RunDir(target)
        return Path(run.final_outcome(run.load_recipe()).adapter)
    merged = RunDir(target.parent).merged
    return merged if (merged / "tokenizer_config.json").is_file() else None


def examples_for(recipe: Recipe | None, stage: str | None, data: str | None, tokenizer, log) -> tuple[list[dict], str]:
    from ..data.prepare import prepare_stage

    if data is not None:
        synthetic = Recipe.model_validate({
            "name": "eval", "model": {"base": "eval", "chat_template": recipe.model.chat_template if recipe else None,
                                      "max_seq_length": recipe.model.max_seq_length if recipe else 2048},
            "stages": [{"name": "eval", "data": {"source": data, "val_size": 0}, "train": {"max_steps": 1}}]})
        prepared = prepare_stage(synthetic, synthetic.stages[0], tokenizer, log=log)
        return prepared.train, data
    if recipe is None:
        raise TunebookError("say what to score: --recipe RECIPE --stage NAME (its validation set) or --data SOURCE")
    column = stage
    chosen = recipe.stage(stage.split("/")[0]) if stage else recipe.stages[-1]
    prepared = prepare_stage(recipe, chosen, tokenizer, log=log)
    if not prepared.val:
        raise TunebookError(f"stage {chosen.name} has no validation set (val_size 0)\n    fix: use --data SOURCE")
    if column and column != chosen.name:
        if column not in prepared.val_sets:
            raise TunebookError(f"stage {chosen.name} has no validation set named {column!r}\n"
                                f"    fix: use one of: {', '.join([chosen.name, *prepared.val_sets])}")
        return prepared.val_sets[column], f"{recipe.name}/{column} validation set"
    several = f" ({len(prepared.val_sets)} sets, together)" if len(prepared.val_sets) > 1 else ""
    return prepared.val, f"{recipe.name}/{chosen.name} validation set{several}"


def torch_model(target: Path, kind: str, log):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..model.load import model_source, resolve_dtype
    from .forgetting import stage_model

    if kind == "run":
        run = RunDir(target)
        recipe = run.load_recipe()
        ref = model_source(recipe.model, run.path, log)
        return stage_model(ref, recipe, resolve_dtype(recipe.model), run.final_outcome(recipe))
    if kind == "adapter":
        base = json.loads((target / "adapter_config.json").read_text()).get("base_model_name_or_path")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(model, str(target))
    return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)


def evaluate_target(target: Path, recipe_path: Path | None = None, stage: str | None = None, data: str | None = None,
                    batch_size: int = 4, overrides: list[str] | None = None, log=print, quant: str | None = None) -> dict:
    """`quant`: score the run's GGUF of that type (RunDir.find_gguf) instead of its final adapter."""
    from transformers import AutoTokenizer

    kind = _kind(target)
    recipe = load_recipe(recipe_path, overrides or []) if recipe_path else None
    if recipe is None and kind == "run":
        recipe = RunDir(target).load_recipe()
    if recipe is not None and stage:
        recipe.stage(stage.split("/")[0])  # a misspelled stage is said first, before any model or tokenizer loads
    if quant is not None:
        if kind != "run":
            raise TunebookError(f"--quant {quant} picks among a run's GGUFs, but {target} is not a run directory\n"
                                "    fix: pass the run directory, or the .gguf file itself without --quant")
        target, kind = RunDir(target).find_gguf(quant), "gguf"
    if kind == "gguf":
        from chat.engine import ChatError, check_gguf

        try:
            check_gguf(target)
        except ChatError as exc:
            raise TunebookError(f"{exc}\n    fix: pass a GGUF written by `tunebook export` (or its run directory)") from None
    tok_dir = tokenizer_dir(target, kind)
    if tok_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        template = tok_dir / "chat_template.jinja"
        if template.is_file() and template.read_text().strip():
            tokenizer.chat_template = template.read_text()
    elif recipe is not None:
        from ..model.base import load_tokenizer

        tokenizer = load_tokenizer(recipe.model)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(target.parent, gguf_file=target.name)
        except Exception as exc:  # the file's own parser: a cut-off file fails anywhere in it
            raise TunebookError(f"{target}: its tokenizer cannot be read ({type(exc).__name__}: {exc})\n"
                                "    fix: check that the file is complete (a cut-off copy or download?), or export "
                                "it again") from None
    examples, what = examples_for(recipe, stage, data, tokenizer, log)
    if kind == "gguf":
        result: EvalResult = evaluate_gguf(target, examples)
    else:
        model = torch_model(target, kind, log)
        result = evaluate_torch(model, examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id)
    return {"target": str(target), "kind": kind, "data": what, **result.to_dict()}
