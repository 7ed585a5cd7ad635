"""Training speed of the quickstart model (Gemma 3 270M + LoRA r16, all-linear) on this CPU, per setting.

Every setting trains the same packed ShareGPT rows (forward, backward, AdamW step); settings take turns
step by step (round-robin), so a busy shared machine slows them alike. Reported: trained (label-bearing)
tokens per second of each setting's fastest step (the least disturbed one) and median step, and their ratio
to the baseline, trl's fused LM head with bf16 weights + bf16 autocast
(what SFTTrainer did before runner/fast_head.py).

    .venv/bin/python bench/train_speed.py                # the settings table -> bench/results/train_speed.json
    .venv/bin/python bench/train_speed.py --profile NAME # one step of a setting under torch.profiler
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import ROOT, matmul_peak_gflops


@dataclass
class Setting:
    name: str
    weights: str = "bfloat16"     # base weights dtype
    autocast: bool = True         # bf16 autocast around forward + backward (what Trainer's bf16=True does)
    head: str = "fast"            # fast | trl | trl-compact
    peft_cast: bool = True        # peft casts each LoRA input to the adapter's fp32 (its default)
    seq: int = 512                # packed row length
    threads: int | None = None
    tokens: bool = False          # also train the <end_of_turn> embedding row (lora.trainable_tokens)

    @property
    def model_key(self) -> tuple:
        return self.weights, self.tokens


SETTINGS = [
    Setting("trl head, bf16 + autocast (before)", head="trl"),
    Setting("trl head compact, bf16 + autocast", head="trl-compact"),
    Setting("trl head, fp32 (before)", weights="float32", autocast=False, head="trl"),
    Setting("fast head, bf16 + autocast"),
    Setting("fast head, bf16 + autocast, no peft input cast", peft_cast=False),
    Setting("fast head, bf16 + autocast, no peft input cast, trainable <end_of_turn>", peft_cast=False, tokens=True),
    Setting("fast head, bf16, no autocast", autocast=False),
    Setting("fast head, fp32 + autocast", weights="float32"),
    Setting("fast head, fp32", weights="float32", autocast=False),
    Setting("fast head, bf16 + autocast, 1 thread", threads=1),
    Setting("fast head, bf16 + autocast, rows of 256", seq=256),
    Setting("fast head, bf16 + autocast, rows of 1024", seq=1024),
]


def quickstart_rows(tokens_per_step: int):
    """Packed ShareGPT rows of 256, 512 and 1024 tokens made from the same samples (those <= 256 tokens)."""
    from runner.model.base import load_tokenizer
    from runner.data.pack import pack_examples
    from runner.data.prepare import prepare_stage
    from runner.model.load import model_source
    from runner.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    model_ref = model_source(recipe.model, recipe.base_dir, log=lambda *_: None)
    tokenizer = load_tokenizer(recipe.model, base_dir=recipe.base_dir)
    data = prepare_stage(recipe, recipe.stages[0], tokenizer, log=lambda *_: None)
    short = [e for e in data.train if len(e["input_ids"]) <= 256]
    rows = {}
    for seq in (256, 512, 1024):
        packed = pack_examples(short, seq)
        packed.sort(key=lambda r: -len(r["input_ids"]))
        rows[seq] = packed[: max(1, tokens_per_step // seq) * 4]  # 4 different batches per length
    return recipe, model_ref, tokenizer, rows


def build(model_ref, recipe, tokenizer, weights: str, tokens: bool):
    from peft import get_peft_model

    from runner.model.load import load_base, lora_config

    torch.manual_seed(0)
    base = load_base(model_ref, recipe.model, getattr(torch, weights))
    ids = [tokenizer.convert_tokens_to_ids("<end_of_turn>")] if tokens else None
    return get_peft_model(base, lora_config(recipe.lora, ids))


def set_head(model, head: str) -> None:
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from runner.model.fast_head import add_fast_lm_head

    model.get_base_model().__dict__.pop("forward", None)  # back to the class forward before patching again
    if head == "fast":
        add_fast_lm_head(model)
    else:  # as SFTTrainer installs it; "compact" scores only labelled rows, as trl does on Triton devices
        trl_utils._use_triton = (lambda device: True) if head == "trl-compact" else _TRL_USE_TRITON
        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))


def set_peft_cast(model, enabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = enabled


def collate(rows, tokenizer, seq):
    from runner.data.pack import make_collator

    return make_collator(tokenizer, packing=True, max_length=seq)(rows)


def step(model, optimizer, batch, setting: Setting) -> tuple[float, int]:
    """One optimizer step on one batch; (seconds, trained tokens)."""
    set_head(model, setting.head)
    set_peft_cast(model, setting.peft_cast)
    torch.set_num_threads(setting.threads or _THREADS)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if setting.autocast else contextlib.nullcontext()
    start = time.perf_counter()
    with amp:
        out = model(**batch, fused_lm_head=True)
        out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    torch.set_num_threads(_THREADS)
    return seconds, trained


_TRL_USE_TRITON = None
_THREADS = torch.get_num_threads()


def main() -> None:
    global _TRL_USE_TRITON
    import trl.trainer.utils as trl_utils

    _TRL_USE_TRITON = trl_utils._use_triton
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (rows x row length)")
    parser.add_argument("--rounds", type=int, default=3, help="measured steps per setting (after one warm-up)")
    parser.add_argument("--only", nargs="*", help="settings whose name contains one of these")
    parser.add_argument("--profile", help="profile one step of the setting of this name (or the one whose name contains it)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_speed.json"))
    args = parser.parse_args()

    recipe, model_ref, tokenizer, rows = quickstart_rows(args.tokens)
    settings = [s for s in SETTINGS if not args.only or any(o in s.name for o in args.only)]
    if args.profile:
        exact = [s for s in SETTINGS if s.name == args.profile]
        settings = exact or [s for s in SETTINGS if args.profile in s.name]
        if len(settings) != 1:
            names = "\n  ".join(s.name for s in (settings or SETTINGS))
            parser.error(f"--profile {args.profile!r} names {'no' if not settings else 'more than one'} setting; "
                         f"give one of:\n  {names}")
    models = {key: build(model_ref, recipe, tokenizer, *key) for key in sorted({s.model_key for s in settings})}
    optimizers = {key: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for key, m in models.items()}

    def batch(setting: Setting, i: int):
        per = max(1, args.tokens // setting.seq)
        chunk = rows[setting.seq][(i % 4) * per:(i % 4 + 1) * per]
        return collate(chunk, tokenizer, setting.seq)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        s = settings[0]
        step(models[s.model_key], optimizers[s.model_key], batch(s, 0), s)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(models[s.model_key], optimizers[s.model_key], batch(s, 1), s)
        print(f"# {s.name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))
        return

    times: dict[str, list[tuple[float, int]]] = {s.name: [] for s in settings}
    for r in range(args.rounds + 1):
        for s in settings:
            seconds, trained = step(models[s.model_key], optimizers[s.model_key], batch(s, r), s)
            if r:  # round 0 warms up
                times[s.name].append((seconds, trained))
            print(f"round {r} {s.name}: {seconds:.2f} s, {trained} trained tokens", flush=True)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": _THREADS,
                          "torch": torch.__version__,
                          "matmul_gflops": {"float32": matmul_peak_gflops("float32"),
                                            "bfloat16": matmul_peak_gflops("bfloat16")}},
              "tokens_per_step": args.tokens, "rounds": args.rounds, "settings": []}
    baseline = None
    for s in settings:
        rates = [n / t for t, n in times[s.name]]
        best, median = max(rates), statistics.median(rates)
        baseline = baseline or (best, median)
        result["settings"].append({"name": s.name, "best_tokens_per_s": round(best, 1),
                                   "median_tokens_per_s": round(median, 1),
                                   "best_vs_baseline": round(best / baseline[0], 2),
                                   "median_vs_baseline": round(median / baseline[1], 2)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| setting | trained tokens/s, best step | vs baseline | median step | vs baseline |\n|---|---|---|---|---|")
    for row in result["settings"]:
        print(f"| {row['name']} | {row['best_tokens_per_s']} | {row['best_vs_baseline']:.2f}x | "
              f"{row['median_tokens_per_s']} | {row['median_vs_baseline']:.2f}x |")
    print(f"matmul GFLOP/s: {result['machine']['matmul_gflops']}")


if __name__ == "__main__":
    main()
