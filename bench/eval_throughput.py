"""eval_throughput: perplexity tokens/s of tunebook's evaluation versus HF `Trainer.evaluate` on the same set,
and whether the two give the same result.

Both sides score the vet validation set of runs/quickstart with the model `tunebook eval runs/quickstart
--stage vet` builds (base in the run's dtype, bf16 here, + the `general` adapter merged + the `vet` adapter,
unmerged; no autocast), on the same tokenized examples (assistant-only labels), same batch size:

* tunebook: `eval.perplexity.evaluate_torch` (rows sorted longest first, tunebook's fast LM head that projects
  only scored positions, float64 totals): exp(total NLL / scored tokens).
* baseline: a plain `transformers.Trainer(model, TrainingArguments(per_device_eval_batch_size=B),
  eval_dataset, data_collator).evaluate()` (dataset order, the model's own full-logits loss). Its eval_loss
  is the mean of the per-batch mean losses, so with unequal scored tokens per batch it is not
  token-weighted. A forward hook (outside the Trainer, negligible cost) records each batch's mean loss and
  scored-token count, from which the token-weighted loss is recomputed (`token_weighted_loss`).

Both sides run alternating in ONE process on the same model object (one model load; a shared, busy machine
slows both alike): at the default batch, `--rounds` rounds, the order swapped each round (tunebook first
in odd rounds); then once each at batch size 1. Peak RSS is therefore not measured per side. Scored
tokens/s = scored tokens / wall seconds of the evaluate call (data collation included on both sides).

    .venv/bin/python bench/eval_throughput.py              # -> bench/results/eval_throughput.json
    .venv/bin/python bench/eval_throughput.py --rounds 2 --batch1-examples 16   # batch 1 on the first 16 only
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import tempfile
import time

from bench.common import ROOT

RUN = ROOT / "runs" / "quickstart"


# ------------------------------------------------------------------------------------------------
# pure computations (tests/test_bench_packing_eval.py)


def token_weighted_loss(batch_losses: list[float], batch_tokens: list[int]) -> float:
    """Mean NLL per scored token from per-batch mean losses and their scored-token counts."""
    total = sum(n for n in batch_tokens)
    return sum(loss * n for loss, n in zip(batch_losses, batch_tokens)) / total if total else float("nan")


def batch_mean_loss(batch_losses: list[float], batch_rows: list[int], eval_batch_size: int) -> float:
    """Trainer.evaluate's eval_loss: each batch's mean loss repeated `eval_batch_size` times, then averaged
    (transformers' evaluation_loop: `losses.repeat(batch_size)`, `all_losses.mean()`), i.e. the plain
    mean of batch means; `batch_rows` only checks that no batch is larger than the batch size."""
    if any(r > eval_batch_size for r in batch_rows):
        raise ValueError("a batch holds more rows than the batch size")
    repeated = [loss for loss in batch_losses for _ in range(eval_batch_size)]
    return sum(repeated) / len(repeated) if repeated else float("nan")


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else float("nan")


# ------------------------------------------------------------------------------------------------
# the two sides


def load(examples_limit: int | None):
    """(model, examples, pad_id) exactly as `tunebook eval runs/quickstart --stage vet` builds them."""
    from transformers import AutoTokenizer

    from runner.measure.evaluate import examples_for, tokenizer_dir, torch_model
    from runner.run_dir import RunDir

    if not (RUN / "recipe.yaml").is_file() or not (RUN / "vet" / "adapter").is_dir():
        sys.exit(f"{RUN} is missing or unfinished: run `make demo` first (it trains the quickstart run)")
    quiet = lambda *_: None  # noqa: E731
    recipe = RunDir(RUN).load_recipe()
    tok_dir = tokenizer_dir(RUN, "run")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    template = tok_dir / "chat_template.jinja"
    if template.is_file() and template.read_text().strip():
        tokenizer.chat_template = template.read_text()
    examples, _ = examples_for(recipe, "vet", None, tokenizer, quiet)
    if examples_limit:
        examples = examples[:examples_limit]
    model = torch_model(RUN, "run", quiet)
    return model, examples, tokenizer.pad_token_id


def run_tunebook(model, examples, batch_size: int, pad_id: int) -> dict:
    from eval.perplexity import evaluate_torch

    start = time.perf_counter()
    r = evaluate_torch(model, examples, batch_size=batch_size, pad_id=pad_id, progress=False)
    seconds = time.perf_counter() - start
    return {"loss": r.loss, "ppl": r.ppl, "tokens": r.tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(r.tokens / seconds, 2)}


def run_trainer(model, examples, batch_size: int, pad_id: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from eval.perplexity import collate

    losses, tokens, rows = [], [], []

    def record(module, args, kwargs, output):  # each batch's mean loss and scored tokens, as Trainer saw them
        labels = kwargs["labels"]
        losses.append(float(output.loss))
        tokens.append(int((labels[:, 1:] != -100).sum()))
        rows.append(int(labels.shape[0]))

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, use_cpu=True,
                                 report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                                 remove_unused_columns=False, bf16=False, fp16=False)
        trainer = Trainer(model=model, args=args, eval_dataset=Dataset.from_list(
                              [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]),
                          data_collator=functools.partial(collate, pad_id=pad_id))
        hook = model.register_forward_hook(record, with_kwargs=True)
        try:
            start = time.perf_counter()
            metrics = trainer.evaluate()
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
    del trainer
    torch.set_grad_enabled(True)
    weighted = token_weighted_loss(losses, tokens)
    n = sum(tokens)
    return {"eval_loss": metrics["eval_loss"], "exp_eval_loss": math.exp(metrics["eval_loss"]),
            "batch_mean_loss_recomputed": batch_mean_loss(losses, rows, batch_size),
            "token_weighted_loss": weighted, "token_weighted_ppl": math.exp(weighted), "tokens": n,
            "batches": len(losses), "seconds": round(seconds, 2), "tokens_per_s": round(n / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4, help="the default batch (tunebook eval's --batch-size)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds of both sides at the default batch")
    parser.add_argument("--examples", type=int, default=None, help="only the first N validation examples")
    parser.add_argument("--batch1-examples", type=int, default=None,
                        help="the batch-size-1 comparison on only the first N examples (0: skip it)")
    args = parser.parse_args()

    from bench.common import machine, write_result

    info = machine()
    model, examples, pad_id = load(args.examples)
    sides = {"tunebook": run_tunebook, "trainer": run_trainer}
    runs: dict[str, list[dict]] = {"tunebook": [], "trainer": []}
    for r in range(args.rounds):
        order = ["tunebook", "trainer"] if r % 2 == 0 else ["trainer", "tunebook"]
        for side in order:
            runs[side].append(sides[side](model, examples, args.batch_size, pad_id))
            print(f"round {r} batch {args.batch_size} {side}: {runs[side][-1]}", flush=True)
    batch1 = {}
    if args.batch1_examples != 0:
        subset = examples[:args.batch1_examples] if args.batch1_examples else examples
        for side in ("trainer", "tunebook"):
            batch1[side] = sides[side](model, subset, 1, pad_id)
            print(f"batch 1 {side}: {batch1[side]}", flush=True)

    tb, tr = runs["tunebook"][-1], runs["trainer"][-1]
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["tunebook"], runs["trainer"])]

    def agreement(t: dict, h: dict) -> dict:
        return {"tunebook_ppl": t["ppl"], "trainer_exp_eval_loss": h["exp_eval_loss"],
                "trainer_token_weighted_ppl": h["token_weighted_ppl"],
                "gap_exp_eval_loss_vs_tunebook": relative_gap(h["exp_eval_loss"], t["ppl"]),
                "gap_token_weighted_vs_tunebook": relative_gap(h["token_weighted_ppl"], t["ppl"]),
                "scored_tokens": [t["tokens"], h["tokens"]]}

    result = {
        "what": "scored tokens/s of tunebook's perplexity (evaluate_torch) vs transformers Trainer.evaluate, "
                "quickstart vet validation set, same model (bf16 base + adapters, no autocast), same examples",
        "how": "one process, same model object, sides alternating (order swapped each round); wall time of "
               "each evaluate call",
        "examples": len(examples), "batch_size": args.batch_size, "rounds": args.rounds,
        "tunebook": runs["tunebook"], "trainer": runs["trainer"],
        "speedup_per_round": [round(x, 2) for x in ratios],
        "speedup_median": round(statistics.median(ratios), 2),
        "results_default_batch": agreement(tb, tr),
        "batch_1": ({"examples": len(examples[:args.batch1_examples] if args.batch1_examples else examples),
                     "tunebook": batch1["tunebook"], "trainer": batch1["trainer"],
                     "speedup": round(batch1["tunebook"]["tokens_per_s"] / batch1["trainer"]["tokens_per_s"], 2),
                     **agreement(batch1["tunebook"], batch1["trainer"])} if batch1 else None),
    }
    path = write_result("eval_throughput", result, info)
    print("\n| | tunebook | Trainer.evaluate | ratio |\n|---|---|---|---|")
    print(f"| scored tokens/s, batch {args.batch_size} | {tb['tokens_per_s']} | {tr['tokens_per_s']} | "
          f"{result['speedup_median']}x |")
    a = result["results_default_batch"]
    print(f"| ppl, batch {args.batch_size} | {a['tunebook_ppl']:.5f} | exp(eval_loss) {a['trainer_exp_eval_loss']:.5f},"
          f" token-weighted {a['trainer_token_weighted_ppl']:.5f} | |")
    if batch1:
        b = result["batch_1"]
        print(f"| scored tokens/s, batch 1 | {b['tunebook']['tokens_per_s']} | {b['trainer']['tokens_per_s']} | "
              f"{b['speedup']}x |")
        print(f"| ppl, batch 1 | {b['tunebook_ppl']:.5f} | exp(eval_loss) {b['trainer_exp_eval_loss']:.5f}, "
              f"token-weighted {b['trainer_token_weighted_ppl']:.5f} | |")
    print(f"written {path}")


if __name__ == "__main__":
    main()
