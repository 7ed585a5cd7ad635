"""One stage of a recipe on the hf backend: transformers + peft + trl's SFTTrainer.

The data arrives tokenized with labels (runner/data.py); the trainer only optimizes. Evaluation is
replaced by the project's token-weighted perplexity (eval/perplexity.py), so the number logged during
training is the number `tunebook eval` reports, whatever the batch size or the number of ranks.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eval.perplexity import evaluate_torch

from . import atomic
from .fast_head import add_fast_lm_head
from .metrics import MetricsLog
from .model import device
from .progress import StageProgress
from .recipe import Recipe, StageConfig

OPTIMIZERS = {"adamw_torch": "adamw_torch", "adamw_torch_fused": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit",
              "paged_adamw_8bit": "paged_adamw_8bit", "adafactor": "adafactor", "sgd": "sgd"}


@dataclass
class StageOutcome:
    """What a finished (or interrupted) stage leaves for the next one; saved as <stage>/stage.json."""

    name: str
    status: str                      # done | interrupted
    adapter: str | None              # the adapter the next stage and export use
    lineage: list[str] = field(default_factory=list)  # adapters merged into the base before `adapter`
    steps: int = 0
    best_step: int | None = None
    best_eval_loss: float | None = None
    best_eval_ppl: float | None = None
    kept: str = "last"
    seconds: float = 0.0
    world_size: int = 1

    def save(self, stage_dir: Path) -> None:
        """Adapter paths inside the run directory are stored relative to it, so a run directory can be
        moved, copied or used from any working directory."""
        run_dir = stage_dir.resolve().parent
        data = asdict(self)
        data["adapter"] = _portable(self.adapter, run_dir)
        data["lineage"] = [_portable(p, run_dir) for p in self.lineage]
        atomic.write_text(stage_dir / "stage.json", json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, stage_dir: Path) -> "StageOutcome | None":
        path = stage_dir / "stage.json"
        if not path.is_file():
            return None
        outcome = cls(**json.loads(path.read_text()))
        run_dir = stage_dir.resolve().parent
        outcome.adapter = _located(outcome.adapter, run_dir)
        outcome.lineage = [_located(p, run_dir) for p in outcome.lineage]
        return outcome


def _portable(path: str | None, run_dir: Path) -> str | None:
    if path is None:
        return None
    absolute = Path(path).resolve()
    return str(absolute.relative_to(run_dir)) if absolute.is_relative_to(run_dir) else str(absolute)


def _located(path: str | None, run_dir: Path) -> str | None:
    """Relative to the run directory; stage.json files written relative to the working directory still load."""
    if path is None or Path(path).is_absolute():
        return path
    inside = run_dir / path
    return str(inside) if inside.exists() or not Path(path).exists() else str(Path(path).resolve())


def is_complete_checkpoint(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and any(path.glob("adapter_model.*")) and \
        (path / "optimizer.pt").is_file()


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint; a half-written one (killed while saving) is removed."""
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if
                   p.name.split("-")[-1].isdigit() else -1)
    for path in reversed(found):
        if is_complete_checkpoint(path):
            return path
        shutil.rmtree(path, ignore_errors=True)
    return None


def sft_config(recipe: Recipe, stage: StageConfig, stage_dir: Path, autocast_bf16: bool):
    from trl import SFTConfig

    t = stage.train
    return SFTConfig(
        output_dir=str(stage_dir / "checkpoints"),
        report_to=["tensorboard"],
        max_steps=t.max_steps if t.max_steps is not None else -1,
        num_train_epochs=t.num_epochs if t.num_epochs is not None else 1,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=OPTIMIZERS[t.optimizer],
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=2,
        bf16=autocast_bf16,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        max_length=None,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        ddp_find_unused_parameters=False,
        save_only_model=False,
        # unpacked samples in batches of similar length (packed rows are already full): far less padding
        train_sampling_strategy="random" if t.packing else "group_by_length",
    )


class Interrupt:
    """First Ctrl-C: save a checkpoint at the end of the current step and stop. Second: stop now."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def make_trainer(recipe, stage, stage_dir, model, tokenizer, data, collator, autocast_bf16, metrics: MetricsLog,
                 progress: StageProgress, interrupt: Interrupt, best_dir: Path):
    """An SFTTrainer whose evaluation is the project's token-weighted perplexity."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    t = stage.train
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(stage_dir / "tensorboard")

    class StageTrainer(SFTTrainer):
        tokens_seen = 0.0
        best_loss = math.inf
        best_step: int | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs.get("labels")
            if labels is not None:
                self.tokens_seen += float((labels[..., 1:] != -100).sum())
            return super().training_step(model, inputs, num_items_in_batch)

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            rows = {id(p) for n, p in self.model.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad}
            if rows and stage.train.trainable_tokens_lr:  # lora.trainable_tokens in a group of their own
                for group in list(optimizer.param_groups):
                    group["params"] = [p for p in group["params"] if id(p) not in rows]
                    if not group["params"]:
                        optimizer.param_groups.remove(group)
                optimizer.add_param_group({"params": [p for p in self.model.parameters() if id(p) in rows],
                                           "lr": stage.train.trainable_tokens_lr, "weight_decay": 0.0})
            return optimizer

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            # bf16 autocast as in training (accelerate applies it only to a prepared model's forward)
            with torch.autocast(device(), dtype=torch.bfloat16, enabled=autocast_bf16):
                result = evaluate_torch(self.model, data.val, batch_size=t.eval_batch_size or t.micro_batch_size,
                                        progress=False, pad_id=tokenizer.pad_token_id)
            metrics = {f"{metric_key_prefix}_loss": result.loss, f"{metric_key_prefix}_ppl": result.ppl,
                       f"{metric_key_prefix}_tokens": result.tokens}
            step = self.state.global_step
            if result.loss < self.best_loss:
                self.best_loss, self.best_step = result.loss, step
                if stage.train.keep == "best" and self.is_world_process_zero():
                    with atomic.atomic_dir(best_dir) as tmp:
                        self.model.save_pretrained(tmp)
                        (tmp / "step").write_text(str(step))
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    class Report(TrainerCallback):
        """metrics.jsonl rows, the progress bar, and Ctrl-C handling."""

        def __init__(self):
            self.start = time.perf_counter()
            self.base_seconds = 0.0

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "train_runtime" in logs:
                return
            tokens = torch.tensor([trainer.tokens_seen], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(tokens)
            if not state.is_world_process_zero:
                return
            row = {"step": state.global_step, "epoch": state.epoch, "loss": logs.get("loss"),
                   "eval_loss": logs.get("eval_loss"), "eval_ppl": logs.get("eval_ppl"),
                   "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                   "tokens_seen": int(tokens.item()), "seconds": round(self.base_seconds + time.perf_counter() - self.start, 3)}
            metrics.append(row)
            progress.log(row)

        def on_step_end(self, args, state, control, **kw):
            progress.step(state.global_step)
            if interrupt.requested:
                control.should_save = True
                control.should_training_stop = True

    report = Report()
    trainer = StageTrainer(
        model=model,
        args=sft_config(recipe, stage, stage_dir, autocast_bf16),
        data_collator=collator,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.val[:1]) if data.val else None,
        processing_class=tokenizer,
        callbacks=[report],
    )
    trainer.report = report
    trainer.remove_callback(PrinterCallback)  # our own progress replaces its printed dicts
    # trl's fused head (installed by SFTTrainer) projects every position off Triton devices; ours only the
    # trained ones, in fewer passes (runner/fast_head.py). Models it does not cover keep trl's.
    add_fast_lm_head(trainer.model)
    if autocast_bf16:  # autocast runs LoRA in bf16 anyway; peft's cast of each LoRA input to fp32 is wasted work
        for module in trainer.model.modules():
            if hasattr(module, "lora_A"):
                module.cast_input_dtype_enabled = False
    return trainer


def _device_label(world_size: int) -> str:
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return where + (f" x {world_size} ranks" if world_size > 1 else "")


def run_stage(recipe: Recipe, stage: StageConfig, stage_dir: Path, model, tokenizer, data, collator, lineage: list[str],
              autocast_bf16: bool, log=print) -> StageOutcome:
    """Train one stage (resuming from its last checkpoint if there is one) and save its adapter."""
    metrics = MetricsLog(stage_dir / "metrics.jsonl")
    checkpoint = last_checkpoint(stage_dir / "checkpoints")
    resumed_step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    if checkpoint:
        metrics.trim(resumed_step)
        log(f"stage {stage.name}: resuming from {checkpoint.name}")
    else:
        metrics.trim(-1)
    best_dir = stage_dir / "best-adapter"
    with Interrupt() as interrupt:
        progress = StageProgress(stage.name, total=None, log=log)
        trainer = make_trainer(recipe, stage, stage_dir, model, tokenizer, data, collator, autocast_bf16, metrics,
                               progress, interrupt, best_dir)
        trainer.tokens_seen = float(metrics.last("tokens_seen"))
        trainer.report.base_seconds = float(metrics.last("seconds"))
        progress.start(trainer.args.max_steps if trainer.args.max_steps > 0 else None, resumed_step,
                       _device_label(trainer.args.world_size))
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            progress.stop()
        steps = trainer.state.global_step
        if interrupt.requested:
            return StageOutcome(stage.name, "interrupted", None, lineage, steps)
        if stage.train.eval_steps and data.val and trainer.best_step != steps and steps % stage.train.eval_steps:
            trainer.evaluate()  # the last step is always evaluated, so `last` and `best` compare fairly
    seconds = metrics.last("seconds")
    outcome = StageOutcome(stage.name, "done", str(stage_dir / "adapter"), list(lineage), steps,
                           trainer.best_step, None if math.isinf(trainer.best_loss) else trainer.best_loss,
                           kept=stage.train.keep, seconds=seconds, world_size=trainer.args.world_size)
    if outcome.best_eval_loss is not None:
        outcome.best_eval_ppl = math.exp(outcome.best_eval_loss)
    if trainer.is_world_process_zero():
        with atomic.atomic_dir(stage_dir / "adapter") as tmp:
            if stage.train.keep == "best" and (best_dir / "adapter_config.json").is_file():
                for item in best_dir.iterdir():
                    shutil.copy2(item, tmp / item.name)
            else:
                trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template or "")
        outcome.save(stage_dir)
    return outcome
