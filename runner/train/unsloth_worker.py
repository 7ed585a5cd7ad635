"""One tunebook stage trained with unsloth. Runs inside .venv-unsloth as a script
(`python unsloth_worker.py job.json`, started by runner/train/unsloth.py) and imports nothing from
tunebook: the job file says everything (base, LoRA, training settings, the tokenized samples, where to
write). It writes metrics.jsonl rows in tunebook's format as it trains, the adapter, and result.json.

Validation loss is tunebook's definition: total NLL over every labelled token of the validation set
divided by their number (token-weighted across batches), perplexity = exp(loss).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def say(message: str) -> None:
    print(f"tunebook-unsloth: {message}", flush=True)


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_row(path: str, row: dict, fields: list[str]) -> None:
    row = {k: row[k] for k in fields if row.get(k) is not None and not (isinstance(row[k], float) and
                                                                        not math.isfinite(row[k]))}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def collate(rows: list[dict], pad_id: int):
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    ids = [r["input_ids"] + [pad_id] * (n - len(r["input_ids"])) for r in rows]
    labels = [r["labels"] + [-100] * (n - len(r["labels"])) for r in rows]
    mask = [[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rows]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    here = Path(__file__).resolve().parent  # holds tunebook's unsloth.py: never let it shadow the package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl)
    from unsloth import FastLanguageModel

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    if job["gpu_expected"] and not gpu:
        say("warning: a GPU was found outside this environment but its torch cannot use it (a CPU-only torch?)")
    t, out = job["train"], job["out"]
    set_seed(job["seed"])
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(job["dtype"])
    say(f"loading {job['model']} ({'4-bit' if job['load_in_4bit'] else '8-bit' if job['load_in_8bit'] else 'full'}) "
        f"on {device}")
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=job["model"], max_seq_length=job["max_seq_length"], dtype=dtype, load_in_4bit=job["load_in_4bit"],
        load_in_8bit=job["load_in_8bit"], trust_remote_code=job["trust_remote_code"])
    lora = job["lora"]
    targets = LINEAR if lora["target_modules"] == "all-linear" else lora["target_modules"]
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
        bias="none", use_gradient_checkpointing="unsloth" if t["gradient_checkpointing"] else False,
        random_state=job["seed"], use_rslora=lora["use_rslora"])
    if job["continue_from"]:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(Path(job["continue_from"]) / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        if getattr(result, "unexpected_keys", None):
            raise SystemExit(f"the previous adapter does not fit this model: unexpected {result.unexpected_keys[:3]}")
        say(f"continuing the adapter of {job['continue_from']}")
    tokenizer.chat_template = job["chat_template"]
    pad_id = job["pad_id"] if job["pad_id"] is not None else tokenizer.pad_token_id

    train_rows, val_rows = read_rows(job["data"]["train"]), read_rows(job["data"]["val"])
    eval_batch = t["eval_batch_size"] or t["micro_batch_size"]
    if t["bf16"] == "auto":
        bf16 = (gpu and torch.cuda.is_bf16_supported()) or (not gpu and dtype == torch.bfloat16)
    else:
        bf16 = bool(t["bf16"])
    args = SFTConfig(
        output_dir=out["checkpoints"], report_to=[], seed=job["seed"], data_seed=job["seed"],
        max_steps=t["max_steps"] or -1, num_train_epochs=t["num_epochs"] or 1,
        per_device_train_batch_size=t["micro_batch_size"], per_device_eval_batch_size=eval_batch,
        gradient_accumulation_steps=t["gradient_accumulation_steps"], learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler"], warmup_steps=t["warmup_steps"] or t["warmup_ratio"],
        weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"], optim=t["optim"],
        logging_steps=t["logging_steps"], logging_first_step=True,
        eval_strategy="steps" if t["eval_steps"] and val_rows else "no", eval_steps=t["eval_steps"],
        save_strategy="steps" if t["save_steps"] else "no", save_steps=t["save_steps"] or 500, save_total_limit=2,
        bf16=bf16, fp16=gpu and not bf16 and dtype != torch.float32, use_cpu=not gpu,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, max_length=None, packing=False,
        dataset_kwargs={"skip_prepare_dataset": True})
    state = {"tokens": 0.0, "best_loss": math.inf, "best_step": None, "start": time.perf_counter(), "base": 0.0}
    if job["resume_from"]:
        previous = read_rows(out["metrics"]) if Path(out["metrics"]).is_file() else []
        state["tokens"] = float(next((r["tokens_seen"] for r in reversed(previous) if "tokens_seen" in r), 0))
        state["base"] = float(next((r["seconds"] for r in reversed(previous) if "seconds" in r), 0))
    best_dir = Path(out["adapter"]).with_name("best-adapter")

    class StageTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            state["tokens"] += float((inputs["labels"][..., 1:] != -100).sum())
            return super().training_step(model, inputs, num_items_in_batch)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            was_training = self.model.training
            self.model.eval()
            total, count = 0.0, 0
            with torch.no_grad(), self.autocast_smart_context_manager():
                for i in range(0, len(val_rows), eval_batch):
                    batch = {k: v.to(self.model.device) for k, v in collate(val_rows[i:i + eval_batch], pad_id).items()}
                    n = int((batch["labels"][..., 1:] != -100).sum())
                    if n:
                        total += float(self.model(**batch).loss) * n  # the model's loss: mean over labelled tokens
                        count += n
            if was_training:
                self.model.train()
            loss = total / max(count, 1)
            metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_ppl": math.exp(min(loss, 700)),
                       f"{metric_key_prefix}_tokens": count}
            step = self.state.global_step
            if loss < state["best_loss"]:
                state["best_loss"], state["best_step"] = loss, step
                if t["keep"] == "best":
                    shutil.rmtree(best_dir, ignore_errors=True)
                    self.model.save_pretrained(str(best_dir))
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    class Report(TrainerCallback):
        def on_log(self, args, s, control, logs=None, **kw):
            logs = logs or {}
            if "train_runtime" in logs:
                return
            row = {"step": s.global_step, "epoch": s.epoch, "loss": logs.get("loss"),
                   "eval_loss": logs.get("eval_loss"), "eval_ppl": logs.get("eval_ppl"),
                   "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                   "tokens_seen": int(state["tokens"]),
                   "seconds": round(state["base"] + time.perf_counter() - state["start"], 3)}
            append_row(out["metrics"], row, job["metrics_fields"])
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if v is not None}
            say(json.dumps(shown))

    trainer = StageTrainer(model=model, args=args, data_collator=lambda rows: collate(rows, pad_id),
                           train_dataset=Dataset.from_list(train_rows),
                           eval_dataset=Dataset.from_list(val_rows[:1]) if val_rows else None,
                           processing_class=tokenizer, callbacks=[Report()])
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train(resume_from_checkpoint=job["resume_from"])
    steps = trainer.state.global_step
    if t["eval_steps"] and val_rows and state["best_step"] != steps and steps % t["eval_steps"]:
        trainer.evaluate()  # the last step is always evaluated, as on the hf backend

    adapter = Path(out["adapter"])
    shutil.rmtree(adapter, ignore_errors=True)
    if t["keep"] == "best" and (best_dir / "adapter_config.json").is_file():
        shutil.copytree(best_dir, adapter)
    else:
        model.save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    (adapter / "chat_template.jinja").write_text(job["chat_template"] or "")
    if gpu:
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"steps": steps, "device": device, "peak_memory_bytes": peak, "tokens_seen": int(state["tokens"]),
              "seconds": round(state["base"] + time.perf_counter() - state["start"], 3),
              "unsloth": unsloth.__version__, "torch": torch.__version__}
    Path(out["result"]).write_text(json.dumps(result, indent=2) + "\n")
    say(f"done: {steps} steps, {result['tokens_seen']:,} trained tokens in {result['seconds']:.1f} s on {device}")


if __name__ == "__main__":
    main(sys.argv[1])
