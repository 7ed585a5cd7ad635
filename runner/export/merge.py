"""Merge a run's final adapter (and the adapters of earlier `merge` stages) into a full-precision copy of
its base: runs/<name>/merged/, with the training chat template beside the tokenizer."""
from __future__ import annotations

import gc
import warnings
from pathlib import Path

import torch

from .. import atomic
from ..console import progress
from ..model.load import estimate_bytes, model_source
from ..recipe import Recipe
from ..run_dir import RunDir, file_identity


def merge_dtype(n_params: int) -> torch.dtype:
    """float32 up to 2B parameters (exact), bfloat16 above (half the memory, the usual release precision)."""
    return torch.float32 if n_params <= 2_000_000_000 else torch.bfloat16


def merge_inputs(recipe: Recipe, run: RunDir) -> dict:
    """What the merged model is made from: the base and every adapter in the final stage's chain."""
    outcome = run.final_outcome(recipe)
    adapters = [Path(p) for p in outcome.lineage] + [Path(outcome.adapter)]
    root = run.path.resolve()
    return {"base": recipe.model.base,
            "adapters": [[str(a.relative_to(root)) if a.is_relative_to(root) else str(a), file_identity(a)]
                         for a in adapters]}


def merge_run(recipe: Recipe, run: RunDir, log=print) -> Path:
    """runs/<name>/merged: base (+ adapters merged by earlier `merge` stages) + the final adapter."""
    outcome = run.final_outcome(recipe)
    adapters = [Path(p) for p in outcome.lineage] + [Path(outcome.adapter)]
    merged_dir = run.merged
    inputs = merge_inputs(recipe, run)
    if run.fresh(merged_dir, inputs):
        log(f"merged model is up to date: {merged_dir}")
        return merged_dir
    with run.making(merged_dir, inputs):
        merge_adapters(recipe, adapters, adapters[-1], merged_dir, log)
    return merged_dir


def merge_adapters(recipe: Recipe, adapters: list[Path], tokenizer_from: Path, out_dir: Path, log=print) -> Path:
    """The recipe's base with `adapters` merged in, in order, saved (safetensors) in `out_dir` with the
    tokenizer and chat template saved beside the adapter `tokenizer_from`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_ref = model_source(recipe.model, recipe.base_dir, log)
    n_params, _ = estimate_bytes(model_ref, recipe.model.model_copy(update={"load_in_4bit": False, "load_in_8bit": False}),
                                 torch.float32)
    dtype = merge_dtype(n_params)
    if recipe.model.load_in_4bit or recipe.model.load_in_8bit:
        log(f"trained on a quantized base: reloading the base in {str(dtype).split('.')[-1]} to merge the adapter")
    kwargs = {"dtype": dtype, "trust_remote_code": recipe.model.trust_remote_code}
    if model_ref.endswith(".gguf"):
        kwargs["gguf_file"] = Path(model_ref).name
        model_ref = str(Path(model_ref).parent)
    with progress("merging", len(adapters) + 2, "steps") as bar:  # load, each adapter, save
        bar.update(status="loading the base")
        model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
        n_params = model.num_parameters()  # tied embeddings counted once (the estimate above counts them twice)
        for adapter in adapters:
            bar.advance(status=f"merging {adapter.parent.name}/{adapter.name}")
            wrapped = PeftModel.from_pretrained(model, str(adapter))
            merge_trainable_tokens_in_place(wrapped)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "All adapters are already merged")  # the token rows, just above
                model = wrapped.merge_and_unload()
            del wrapped
            gc.collect()
        bar.advance(status="saving")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
        template_file = Path(tokenizer_from) / "chat_template.jinja"
        if template_file.is_file() and template_file.read_text().strip():
            tokenizer.chat_template = template_file.read_text()
        with atomic.atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template or "")
        bar.advance(status="")
    del model
    gc.collect()  # the write and the verification read the merged model back: free this copy first
    log(f"merged model saved: {out_dir} ({n_params / 1e6:.0f}M parameters, {str(dtype).split('.')[-1]})")
    return out_dir


def merge_trainable_tokens_in_place(model) -> None:
    """Write the adapter's trained token rows (`trainable_tokens`) into the embedding in place.

    PEFT's own merge builds a new embedding matrix (`index_copy`) for each wrapper, the input embedding
    and, when tied, the output one: two extra copies of the largest tensor (640 MiB each for Gemma 3
    270M's 262k vocabulary) at the merge's peak. The rows written are the same; the layer is marked
    merged, so merge_and_unload only unwraps it."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, TrainableTokensLayer):
                continue
            weight = module.get_base_layer().weight
            for name in module.active_adapters:
                if name in module.merged_adapters or name not in module.token_indices:
                    continue
                index = torch.tensor(module.token_indices[name], device=weight.device)
                weight.data.index_copy_(0, index, module.trainable_tokens_delta[name].to(weight))
                module.merged_adapters.append(name)
