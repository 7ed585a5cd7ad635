"""Merge a run's final adapter into a full-precision copy of its base, save `merged/`, and write the
GGUF the chat app serves (with the training chat template inside), verified against the merged model."""
from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import torch

from . import atomic
from .errors import TunebookError
from .recipe import Recipe, load_recipe
from .train import StageOutcome

QUANTS = ("q8_0", "f16", "f32")


def load_run(run_dir: Path) -> Recipe:
    """The recipe a run was trained with (recipe.yaml in the run directory)."""
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise TunebookError(f"{run_dir} is not a tunebook run directory (no recipe.yaml)\n"
                            "    fix: pass the folder `tunebook train` wrote, e.g. runs/<name>")
    return load_recipe(path)


def final_outcome(recipe: Recipe, run_dir: Path) -> StageOutcome:
    last = recipe.stages[-1].name
    outcome = StageOutcome.load(run_dir / last)
    if outcome is None or outcome.status != "done":
        raise TunebookError(f"stage {last} of {run_dir} has not finished, there is nothing to export yet\n"
                            f"    fix: finish training first (tunebook train {run_dir / 'recipe.yaml'})")
    return outcome


def merge_dtype(n_params: int) -> torch.dtype:
    """float32 up to 2B parameters (exact), bfloat16 above (half the memory, the usual release precision)."""
    return torch.float32 if n_params <= 2_000_000_000 else torch.bfloat16


def merge_run(recipe: Recipe, run_dir: Path, log=print) -> Path:
    """runs/<name>/merged: base (+ adapters merged by earlier `merge` stages) + the final adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import recipe_dir
    from .model import estimate_bytes, model_source

    outcome = final_outcome(recipe, run_dir)
    adapters = [Path(p) for p in outcome.lineage] + [Path(outcome.adapter)]
    merged_dir = run_dir / "merged"
    stamp = merged_dir / "tunebook-merged.json"
    key = {"adapters": [str(a) for a in adapters],
           "adapter_mtimes": [(a / "adapter_config.json").stat().st_mtime for a in adapters]}
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        log(f"merged model is up to date: {merged_dir}")
        return merged_dir
    model_ref = model_source(recipe.model, recipe_dir(recipe), log)
    n_params, _ = estimate_bytes(model_ref, recipe.model.model_copy(update={"load_in_4bit": False, "load_in_8bit": False}),
                                 torch.float32)
    dtype = merge_dtype(n_params)
    if recipe.model.load_in_4bit or recipe.model.load_in_8bit:
        log(f"trained on a quantized base: reloading the base in {str(dtype).split('.')[-1]} to merge the adapter")
    kwargs = {"dtype": dtype, "trust_remote_code": recipe.model.trust_remote_code}
    if model_ref.endswith(".gguf"):
        kwargs["gguf_file"] = Path(model_ref).name
        model_ref = str(Path(model_ref).parent)
    model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
    n_params = model.num_parameters()  # tied embeddings counted once (the estimate above counts them twice)
    for adapter in adapters:
        log(f"merging {adapter}")
        wrapped = PeftModel.from_pretrained(model, str(adapter))
        merge_trainable_tokens_in_place(wrapped)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "All adapters are already merged")  # the token rows, just above
            model = wrapped.merge_and_unload()
        del wrapped
        gc.collect()
    tokenizer = AutoTokenizer.from_pretrained(str(adapters[-1]))
    template_file = adapters[-1] / "chat_template.jinja"
    if template_file.is_file() and template_file.read_text().strip():
        tokenizer.chat_template = template_file.read_text()
    with atomic.atomic_dir(merged_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "chat_template.jinja").write_text(tokenizer.chat_template or "")
        (tmp / stamp.name).write_text(json.dumps(key))
    del model
    gc.collect()  # the write and the verification read merged/ back: free this copy first
    log(f"merged model saved: {merged_dir} ({n_params / 1e6:.0f}M parameters, {str(dtype).split('.')[-1]})")
    return merged_dir


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


def gguf_path(recipe: Recipe, run_dir: Path, quant: str) -> Path:
    return run_dir / f"{recipe.name}-{quant}.gguf"


def verification_summary(report: dict) -> str:
    parts = []
    for backend in ("transformers", "llama.cpp"):
        r = report.get(backend)
        if isinstance(r, dict) and "max_abs_diff" in r:
            parts.append(f"{backend} max |Δlogit| {r['max_abs_diff']:.4g} ({r.get('rel_max_diff', 0):.1%} of the "
                         f"largest logit), argmax agreement {r['argmax_agreement']:.1%}")
        elif r:
            parts.append(f"{backend}: {r}")
    tensors = report.get("tensors")
    head = f"{report.get('quant')}: "
    if isinstance(tensors, dict) and tensors.get("ok"):
        head += (f"{tensors['n_tensors']} tensors ({tensors['n_bytes'] / 2**20:.0f} MiB) identical to the merged "
                 "weights as stored; ")
    return head + f"over {report.get('n_tokens')} probe tokens: " + "; ".join(parts)


def export_run(run_dir: Path, quant: str | None = None, verify: bool | None = None, log=print,
               verify_level: str = "standard") -> Path:
    """Merge, write the GGUF and (by default) verify it: `verify_level` "standard" (every tensor exactly,
    llama.cpp's logits) or "full" (also transformers reading the file back; slow, ~4x the model in
    memory). Returns the GGUF path."""
    from .gguf import write_gguf

    recipe = load_run(run_dir)
    quant = quant or (recipe.export.quantization if recipe.export else "q8_0")
    if quant not in QUANTS:
        raise TunebookError(f"--quant {quant}: unknown quantization\n    fix: use one of {', '.join(QUANTS)}")
    verify = (recipe.export.verify if recipe.export else True) if verify is None else verify
    merged = merge_run(recipe, run_dir, log)
    out = gguf_path(recipe, run_dir, quant)
    template = (merged / "chat_template.jinja").read_text() or None
    log(f"writing {out} ({quant})")
    write_gguf(merged, out, quant=quant, chat_template=template,
               metadata={"name": recipe.name, "base_model": recipe.model.base, "recipe": recipe.name})
    if verify:
        from .gguf_verify import verify_gguf

        try:
            report = verify_gguf(merged, out, quant, level=verify_level)
        except TunebookError:
            bad = out.with_name(out.name + ".failed-verification")
            out.replace(bad)
            log(f"verification failed: the GGUF was moved to {bad}")
            raise
        log("verified: " + verification_summary(report))
    return out
