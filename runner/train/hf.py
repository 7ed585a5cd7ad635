"""backend: hf (the default). A stage trains in this environment: the base loaded by transformers (4-bit or
8-bit through bitsandbytes when the recipe asks), the stage's LoRA adapter put on it by peft as its `init`
says, the samples packed or length-grouped, and trl's SFTTrainer (hf_trainer.py) run over them, also under
`accelerate launch` with several processes."""
from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

from ..data.pack import make_collator, pack_examples
from ..model.load import build_stage_model, float32_note, load_base, resolve_dtype, trainable_token_ids
from ..recipe import Recipe
from ..run_dir import StageOutcome
from .protocol import StageJob
from .hf_trainer import train_stage


class HfBackend:
    name = "hf"

    def check(self, recipe: Recipe) -> None:
        """Everything hf needs is installed with tunebook; 4-bit/8-bit bases are checked when loaded."""

    def run_stage(self, job: StageJob) -> StageOutcome:
        from transformers import set_seed

        recipe, stage, t, log = job.recipe, job.stage, job.stage.train, job.log
        dtype = resolve_dtype(recipe.model)
        bf16 = str(dtype).endswith("bfloat16") if t.bf16 == "auto" else bool(t.bf16)
        log(f"stage {stage.name}: init {stage.init}, base {recipe.model.base}, dtype {str(dtype).split('.')[-1]}"
            f"{' + bf16 autocast' if bf16 else ''}")
        if note := float32_note(recipe.model):
            log(f"stage {stage.name}: {note}")
        set_seed(recipe.seed)  # the new adapter's initial weights are part of the experiment
        base = load_base(job.model_ref, recipe.model, dtype)
        model = build_stage_model(
            base, stage.init, recipe.lora, Path(job.previous.adapter) if job.previous else None,
            [Path(p) for p in job.lineage], quantized=recipe.model.load_in_4bit or recipe.model.load_in_8bit,
            gradient_checkpointing=t.gradient_checkpointing, token_ids=trainable_token_ids(recipe.lora, job.tokenizer))
        data = job.data
        collator = make_collator(job.tokenizer, t.packing, recipe.model.max_seq_length, len(data.mix.parts))
        if t.packing:  # whole rows packed ahead (best-fit decreasing): fuller rows than packing each batch
            data = dataclasses.replace(data, train=pack_examples(data.train, recipe.model.max_seq_length))
            log(f"stage {stage.name}: packed {len(job.data.train)} samples into {len(data.train)} rows")
        try:
            return train_stage(recipe, stage, job.dir, model, job.tokenizer, data, collator, job.lineage, bf16, log=log)
        finally:
            del model, base
            gc.collect()


BACKEND = HfBackend()
