"""The hf trainer of a stage: trl's SFTTrainer over samples tokenized by runner/data, with the project's
token-weighted perplexity as its evaluation (eval/perplexity.py), so the number logged during training is
the number `tunebook eval` reports, whatever the batch size or the number of ranks.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import time

import torch

from eval.labels import IGNORE_INDEX
from eval.perplexity import evaluate_torch

from .. import atomic
from ..model.fast_head import add_fast_lm_head
from ..model.load import device
from ..recipe import OPTIMIZERS, Recipe, StageConfig
from ..run_dir import StageDir, StageOutcome
from .checkpoints import finished_at, last_checkpoint, step_of
from .diverged import fail_stage, first_non_finite
from ..launch import barrier, is_main_process, shards_parameters, world_size
from .gather import adapter_state_dict, save_adapter
from .metrics import MetricsLog, read_metrics
from .progress import StageProgress


def sft_config(recipe: Recipe, stage: StageConfig, stage_dir: StageDir, autocast_bf16: bool):
    from trl import SFTConfig

    t = stage.train
    return SFTConfig(
        output_dir=str(stage_dir.checkpoints),
        report_to=["tensorboard"] if "tensorboard" in recipe.report_to else "none",  # other trackers: runner/share
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
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (and fails the stage), never averaged away
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
    """First Ctrl-C: save a checkpoint at the end of the current step and stop. Second: stop now. A single
    process takes SIGTERM (a scheduler's or a preempted machine's notice) the same way; under a launch the
    launcher owns SIGTERM (it stops every rank when one fails, and a checkpoint then waits on a dead rank)."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        signals = [signal.SIGINT] + ([signal.SIGTERM] if world_size() == 1 else [])
        try:
            for sig in signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, handler)
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


def make_trainer(recipe, stage, stage_dir: StageDir, model, tokenizer, data, collator, autocast_bf16,
                 metrics: MetricsLog, progress: StageProgress, interrupt: Interrupt):
    """An SFTTrainer whose evaluation is the project's token-weighted perplexity."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    t = stage.train
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(stage_dir.tensorboard)

    class StageTrainer(SFTTrainer):
        tokens_seen = 0.0
        diverged: tuple[int, str, float] | None = None  # (step, metric, value) of the first non-finite one
        best_loss = math.inf
        best_step: int | None = None

        mix_tokens = torch.zeros(max(1, len(data.mix.parts)), dtype=torch.float64)  # trained tokens per item

        def training_step(self, model, inputs, num_items_in_batch=None):
            counts = inputs.pop("source_tokens", None)  # a mixed stage: what this batch holds of each item
            if counts is not None:
                self.mix_tokens += counts.to("cpu", torch.float64)
            labels = inputs.get("labels")
            if labels is not None:
                self.tokens_seen += float((labels[..., 1:] != IGNORE_INDEX).sum())
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
            # one evaluation per validation set; the stage's own number is over all of them, token-weighted
            sets = data.val_sets or {"": data.val}
            results = {}
            with torch.autocast(device(), dtype=torch.bfloat16, enabled=autocast_bf16), progress.evaluating() as bar:
                for i, (name, samples) in enumerate(sets.items()):
                    bar.update(status=name or None, total=len(sets) if len(sets) > 1 else None)
                    results[name] = evaluate_torch(self.model, samples, batch_size=t.eval_batch_size or t.micro_batch_size,
                                                   progress=bar.callback(offset=i, span=1) if len(sets) > 1
                                                   else bar.callback(), pad_id=tokenizer.pad_token_id)
            tokens = sum(r.tokens for r in results.values())
            loss = sum(r.loss * r.tokens for r in results.values()) / tokens if tokens else math.nan
            metrics = {f"{metric_key_prefix}_loss": loss,
                       f"{metric_key_prefix}_ppl": math.exp(loss) if loss < 700 else math.inf,
                       f"{metric_key_prefix}_tokens": tokens}
            if len(results) > 1:  # flat keys: TensorBoard draws one curve per validation set
                for name, r in results.items():
                    metrics.update({f"{metric_key_prefix}_loss/{name}": r.loss, f"{metric_key_prefix}_ppl/{name}": r.ppl,
                                    f"{metric_key_prefix}_tokens/{name}": r.tokens})
            step = self.state.global_step
            if loss < self.best_loss:
                self.best_loss, self.best_step = loss, step
                if stage.train.keep == "best":
                    state = adapter_state_dict(self)  # every process: a sharded adapter is gathered first
                    if self.is_world_process_zero():
                        with atomic.atomic_dir(stage_dir.best_adapter) as tmp:
                            save_adapter(self, tmp, state)
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
            mixed = trainer.mix_tokens.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(tokens)
                torch.distributed.all_reduce(mixed)
            row = {"step": state.global_step, "epoch": state.epoch, "loss": logs.get("loss"),
                   "eval_loss": logs.get("eval_loss"), "eval_ppl": logs.get("eval_ppl"),
                   "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                   "tokens_seen": int(tokens.item()), "seconds": round(self.base_seconds + time.perf_counter() - self.start, 3)}
            if trainer.diverged is None:
                trainer.diverged = first_non_finite([row])
            if trainer.diverged is not None:  # every process stops (their logged numbers are the same)
                control.should_training_stop = True
            if not state.is_world_process_zero:
                return
            sets = {name: {k: logs[f"eval_{k}/{name}"] for k in ("loss", "ppl", "tokens")}
                    for name in data.val_sets if f"eval_loss/{name}" in logs}
            if sets:
                row["eval_sets"] = sets
            if len(data.mix.parts) > 1:
                row["mix_tokens"] = {p.name: int(n) for p, n in zip(data.mix.parts, mixed.tolist())}
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


def resumed_best(stage_dir: StageDir, step: int) -> tuple[float, int | None]:
    """(eval loss, step) of the best evaluation up to `step` in metrics.jsonl, the same on every process of a
    launch (the main process reads; a `keep: best` save is a collective all must agree to make)."""
    best = (math.inf, None)
    if is_main_process():
        for row in read_metrics(stage_dir.metrics):
            loss = row.get("eval_loss")
            if isinstance(loss, (int, float)) and row.get("step", 0) <= step and loss < best[0]:
                best = (float(loss), row["step"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [best]
        torch.distributed.broadcast_object_list(shared, src=0)
        best = shared[0]
    return best


def _device_label(world_size: int) -> str:
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return where + (f" x {world_size} ranks" if world_size > 1 else "")


def train_stage(recipe: Recipe, stage: StageConfig, stage_dir: StageDir, model, tokenizer, data, collator,
                lineage: list[str], autocast_bf16: bool, log=print) -> StageOutcome:
    """Train one stage (resuming from its last checkpoint if there is one) and save its adapter. Under a
    multi-process launch the main process alone trims the metrics and removes a broken checkpoint, and
    writes the adapter and stage.json; every process returns once they are written."""
    metrics = MetricsLog(stage_dir.metrics)
    main = is_main_process()
    if main:
        checkpoint = last_checkpoint(stage_dir.checkpoints)
        metrics.trim(step_of(checkpoint) if checkpoint else -1)
    barrier()
    checkpoint = last_checkpoint(stage_dir.checkpoints, remove_broken=False)
    resumed_step = step_of(checkpoint) if checkpoint else 0
    if checkpoint:
        log(f"stage {stage.name}: resuming from {checkpoint.name}")
    with Interrupt() as interrupt:
        progress = StageProgress(stage.name, total=None, log=log)
        trainer = make_trainer(recipe, stage, stage_dir, model, tokenizer, data, collator, autocast_bf16, metrics,
                               progress, interrupt)
        # counters go on from the checkpoint's; they are summed over processes, so only the main one carries them
        trainer.tokens_seen = float(metrics.last("tokens_seen")) if main else 0.0
        resumed_mix = metrics.last("mix_tokens") if main else 0
        if resumed_mix:
            trainer.mix_tokens = torch.tensor([float(resumed_mix.get(p.name, 0)) for p in data.mix.parts],
                                              dtype=torch.float64)
        trainer.report.base_seconds = float(metrics.last("seconds"))
        if checkpoint:  # the best evaluation so far, so `keep: best` compares with it and not with nothing
            trainer.best_loss, trainer.best_step = resumed_best(stage_dir, resumed_step)
        if shards_parameters() == "fsdp" and not trainer.is_fsdp_enabled and main:
            log(f"stage {stage.name}: accelerate shards with FSDP on GPUs only; on the CPU this launch is data "
                "parallel (every process holds the whole model)")
        progress.start(trainer.args.max_steps if trainer.args.max_steps > 0 else None, resumed_step,
                       _device_label(trainer.args.world_size))
        try:
            if checkpoint and finished_at(checkpoint) and not trainer.is_fsdp_enabled:  # FSDP loads inside train()
                # saved at the last step, then stopped before the adapter was written (Ctrl-C, a full disk):
                # its weights are the stage's result; trainer.train would take one step more
                log(f"stage {stage.name}: {checkpoint.name} is the last step; writing the adapter from it")
                from transformers import TrainerState

                trainer._load_from_checkpoint(str(checkpoint))
                trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
            else:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            progress.stop()
        steps = trainer.state.global_step
        last_step = 0 < trainer.state.max_steps <= steps
        if trainer.diverged is not None:
            raise fail_stage(stage_dir, lineage, "hf", *trainer.diverged, dtype=str(model.dtype).split(".")[-1]
                             + (" + bf16 autocast" if autocast_bf16 else ""))
        if interrupt.requested and not last_step:  # a Ctrl-C during the last step: the stage is whole
            return StageOutcome(stage.name, "interrupted", None, lineage, steps)
        if stage.train.eval_steps and data.val and trainer.best_step != steps and steps % stage.train.eval_steps:
            trainer.evaluate()  # the last step is always evaluated, so `last` and `best` compare fairly
    outcome = StageOutcome(stage.name, "done", str(stage_dir.adapter), list(lineage), steps,
                           trainer.best_step, None if math.isinf(trainer.best_loss) else trainer.best_loss,
                           kept=stage.train.keep, seconds=metrics.last("seconds"), world_size=trainer.args.world_size)
    if outcome.best_eval_loss is not None:
        outcome.best_eval_ppl = math.exp(outcome.best_eval_loss)
    state = adapter_state_dict(trainer)  # every process: a sharded adapter is gathered first
    if trainer.is_world_process_zero():
        best = stage_dir.best_adapter
        with atomic.atomic_dir(stage_dir.adapter) as tmp:
            if stage.train.keep == "best" and (best / "adapter_config.json").is_file():
                for item in best.iterdir():
                    shutil.copy2(item, tmp / item.name)
            else:
                save_adapter(trainer, tmp, state)
            tokenizer.save_pretrained(tmp)
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template or "")
        stage_dir.save_outcome(outcome)
    barrier()  # the next stage, on every process, starts from the adapter just written
    return outcome
