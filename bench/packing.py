"""packing: packing efficiency on the ShareGPT data (axolotl reaches 0.998 on FineTome-100k) and the training
speed-up of packing over padded batches. Target: packing efficiency >= 0.99.

Efficiency = real tokens / (rows x row length) of tunebook's packer (runner/data_pack.py: best-fit decreasing,
`packing_efficiency`) on the ShareGPT conversations tokenized as tunebook prepares them (`prepare_stage` on
the quickstart recipe's stage `general`, train split):

* quickstart data: the recipe as it is (8,000 conversations read, those over 512 tokens dropped);
* whole data: every conversation, `model.max_seq_length=2048` (those over 2,048 tokens dropped, as axolotl
  drops sequences longer than sequence_len); and its samples of <= 512 tokens for rows of 512.

Beside each figure: the fewest rows any packer could use (the Martello-Toth L2 lower bound, `rows_lower_bound`)
and so the best efficiency possible; and no packing: batches of 4 padded to their longest sample, in dataset
order and in the length-grouped order the trainer draws unpacked batches in (transformers'
`get_length_grouped_indices`, as its group_by_length sampler).

Speed-up: the stepping of bench/train_speed.py, not the full trainer: the quickstart LoRA model (bf16 base,
LoRA r16 all-linear, trainable <end_of_turn> row, tunebook's fast LM head, peft input cast off, bf16 autocast),
one AdamW step per batch. The same samples (those of `--rows` packed rows of 512 drawn at random from the
quickstart packing) are trained as packed rows (4 a step, as the quickstart) and as padded batches of 4 (dataset
order, and length-grouped order), so every side trains the same label-bearing tokens. Sides alternate step
by step within each round (step k of every side, then step k+1; the side order rotates each round) after one
warm-up step each; trained tokens/s = trained tokens of a
pass / its seconds; reported: median and best over rounds, and their ratios to padded dataset order.

    .venv/bin/python bench/packing.py              # -> bench/results/packing.json (~5-10 min on a loaded machine)
    .venv/bin/python bench/packing.py --no-speed   # efficiency only (~1 min; ~2 min more the first time:
                                                   #  the whole data is tokenized once, then cached)
"""
from __future__ import annotations

import argparse
import bisect
import math
import random
import statistics
import time

from bench.common import ROOT

BATCH = 4  # the quickstart's micro_batch_size


# ------------------------------------------------------------------------------------------------
# pure computations (tests/test_bench_packing_eval.py)


def padded_batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def length_grouped_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """The order an unpacked stage's batches come in: transformers' length-grouped sampler (runner/train.py
    sets train_sampling_strategy="group_by_length"), seeded."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))


def padded_efficiency(lengths: list[int], batch_size: int, order: list[int] | None = None) -> tuple[int, float]:
    """(batches, real tokens / token slots) without packing: batches of `batch_size` in `order` (default:
    dataset order), each padded to its longest sample."""
    order = list(range(len(lengths))) if order is None else order
    batches = padded_batches(order, batch_size)
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return len(batches), (sum(lengths[i] for i in order) / slots if slots else 0.0)


def rows_lower_bound(lengths: list[int], capacity: int) -> int:
    """Martello-Toth L2 lower bound on the number of rows of `capacity` any packing needs. For each threshold
    k <= capacity/2: samples over capacity-k share a row with nothing of length >= k; samples over capacity/2
    need a row each; samples in [k, capacity/2] fill what those leave, then need rows of their own."""
    if not lengths:
        return 0
    ordered = sorted(lengths)
    prefix = [0]
    for n in ordered:
        prefix.append(prefix[-1] + n)

    def count_sum(lo: float, hi: float) -> tuple[int, int]:  # samples with lo < n <= hi
        a, b = bisect.bisect_right(ordered, lo), bisect.bisect_right(ordered, hi)
        return b - a, prefix[b] - prefix[a]

    half = capacity / 2
    best = math.ceil(prefix[-1] / capacity)
    for k in sorted({0} | {n for n in lengths if n <= half}):
        j1, _ = count_sum(capacity - k, math.inf)
        j2, j2_sum = count_sum(half, capacity - k)
        _, j3_sum = count_sum(k - 1, half)
        free = j2 * capacity - j2_sum
        best = max(best, j1 + j2 + max(0, math.ceil((j3_sum - free) / capacity)))
    return best


def efficiency_table(lengths: list[int], capacity: int, seed: int, batch_size: int = BATCH) -> dict:
    """Packed (tunebook), best possible, and padded figures for one set of sample lengths and one row length."""
    from runner.data.pack import packing_efficiency

    rows, eff = packing_efficiency(lengths, capacity)
    bound = rows_lower_bound(lengths, capacity)
    _, pad_order = padded_efficiency(lengths, batch_size)
    _, pad_grouped = padded_efficiency(lengths, batch_size, length_grouped_order(lengths, batch_size, seed))
    return {"row_length": capacity, "samples": len(lengths), "tokens": sum(lengths),
            "samples_over_half_row": sum(1 for n in lengths if n > capacity / 2),
            "packed_rows": rows, "packing_efficiency": round(eff, 4),
            "rows_lower_bound": bound, "best_possible_efficiency": round(sum(lengths) / (bound * capacity), 4),
            f"padded_batch{batch_size}_dataset_order": round(pad_order, 4),
            f"padded_batch{batch_size}_length_grouped": round(pad_grouped, 4)}


# ------------------------------------------------------------------------------------------------
# data


def stage_train(overrides: list[str]):
    from runner.model.base import load_tokenizer
    from runner.data.prepare import prepare_stage
    from runner.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    tokenizer = load_tokenizer(recipe.model, base_dir=recipe.base_dir)
    data = prepare_stage(recipe, recipe.stages[0], tokenizer, log=lambda m: print(m, flush=True))
    return recipe, tokenizer, data.train


def efficiencies() -> list[dict]:
    recipe, _, quick = stage_train([])
    quick_lengths = [len(e["input_ids"]) for e in quick]
    _, _, whole = stage_train(["stages.0.data.max_samples=null", "model.max_seq_length=2048"])
    whole_lengths = [len(e["input_ids"]) for e in whole]
    sets = [("quickstart data (<= 512 tokens)", quick_lengths, (512, 2048)),
            ("whole data, samples <= 512 tokens", [n for n in whole_lengths if n <= 512], (512,)),
            ("whole data (<= 2048 tokens)", whole_lengths, (2048,))]
    table = []
    for name, lengths, capacities in sets:
        for capacity in capacities:
            row = {"data": name, **efficiency_table(lengths, capacity, recipe.seed)}
            table.append(row)
            print(row, flush=True)
    return table


# ------------------------------------------------------------------------------------------------
# speed


def speed(n_rows: int, rounds: int, seed: int = 0) -> dict:
    import torch

    from runner.data.pack import make_collator, pack_examples, plan_bins
    from train_speed import Setting, build, set_peft_cast, step

    from runner.model.load import model_source

    recipe, tokenizer, train = stage_train([])
    seq = recipe.model.max_seq_length
    bins = plan_bins([len(e["input_ids"]) for e in train], seq)
    chosen = random.Random(seed).sample(range(len(bins)), n_rows)
    samples = sorted(i for b in chosen for i in bins[b])  # dataset order
    examples = [train[i] for i in samples]
    lengths = [len(e["input_ids"]) for e in examples]
    rows = pack_examples(examples, seq)
    packed = make_collator(tokenizer, packing=True, max_length=seq)
    padded = make_collator(tokenizer, packing=False, max_length=seq)
    grouped_order = length_grouped_order(lengths, BATCH, recipe.seed)
    sides = {
        "packed rows of 512": [packed(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)],
        "padded, dataset order": [padded([examples[i] for i in b]) for b in padded_batches(list(range(len(examples))), BATCH)],
        "padded, length-grouped": [padded([examples[i] for i in b]) for b in padded_batches(grouped_order, BATCH)],
    }
    trained = {name: sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) for name, batches in sides.items()}
    if len(set(trained.values())) != 1:
        raise RuntimeError(f"the sides train different tokens: {trained}")
    slots = {name: sum(b["input_ids"].numel() for b in batches) for name, batches in sides.items()}

    model_ref = model_source(recipe.model, recipe.base_dir, log=lambda *_: None)
    model = build(model_ref, recipe, tokenizer, "bfloat16", True)
    setting = Setting("fast head, bf16 + autocast, no peft input cast", peft_cast=False)
    set_peft_cast(model, False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for name, batches in sides.items():  # warm-up: one step each (first-call allocations, kernel selection)
        step(model, optimizer, batches[0], setting)
    names = list(sides)
    passes: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):  # one pass of every side, interleaved step by step, the side order rotating
        seconds = {name: 0.0 for name in names}
        for k in range(max(len(b) for b in sides.values())):
            for name in names[r % len(names):] + names[:r % len(names)]:
                if k < len(sides[name]):
                    seconds[name] += step(model, optimizer, sides[name][k], setting)[0]
        for name in names:
            passes[name].append(seconds[name])
            print(f"round {r} {name}: {len(sides[name])} steps, {seconds[name]:.1f} s, "
                  f"{trained[name] / seconds[name]:.1f} trained tokens/s", flush=True)
    base = "padded, dataset order"
    out = {"samples": len(examples), "rows_drawn": n_rows, "trained_tokens_per_pass": trained[base],
           "real_tokens_per_pass": sum(lengths), "rounds": rounds, "sides": []}
    for name in names:
        rates = [trained[name] / s for s in passes[name]]
        base_rates = [trained[base] / s for s in passes[base]]
        out["sides"].append({
            "side": name, "steps_per_pass": len(sides[name]), "token_slots_per_pass": slots[name],
            "fill": round(sum(lengths) / slots[name], 4),
            "pass_seconds": [round(s, 2) for s in passes[name]],
            "median_trained_tokens_per_s": round(statistics.median(rates), 1),
            "best_trained_tokens_per_s": round(max(rates), 1),
            "median_vs_padded_dataset_order": round(statistics.median(rates) / statistics.median(base_rates), 2),
            "best_vs_padded_dataset_order": round(max(rates) / max(base_rates), 2),
            "per_round_vs_padded_dataset_order": [round(a / b, 2) for a, b in zip(rates, base_rates)]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="packed rows of 512 whose samples every side trains")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per side")
    parser.add_argument("--no-speed", action="store_true", help="efficiency figures only")
    args = parser.parse_args()

    from bench.common import machine, write_result

    info = machine()
    start = time.perf_counter()
    result = {"target_packing_efficiency": 0.99, "axolotl_reference": "0.998 on FineTome-100k",
              "efficiency": efficiencies()}
    if not args.no_speed:
        result["speed"] = speed(args.rows, args.rounds)
    result["seconds"] = round(time.perf_counter() - start, 1)
    path = write_result("packing", result, info)
    print("\n| data | row | samples | packed rows | efficiency | best possible | padded, dataset order | "
          "padded, length-grouped |\n|---|---|---|---|---|---|---|---|")
    for r in result["efficiency"]:
        print(f"| {r['data']} | {r['row_length']} | {r['samples']:,} | {r['packed_rows']:,} | "
              f"{r['packing_efficiency']:.4f} | {r['best_possible_efficiency']:.4f} ({r['rows_lower_bound']:,} rows) | "
              f"{r['padded_batch4_dataset_order']:.4f} | {r['padded_batch4_length_grouped']:.4f} |")
    if "speed" in result:
        print("\n| side | steps/pass | fill | trained tokens/s median | best | vs padded dataset order (median, best) |"
              "\n|---|---|---|---|---|---|")
        for s in result["speed"]["sides"]:
            print(f"| {s['side']} | {s['steps_per_pass']} | {s['fill']:.3f} | {s['median_trained_tokens_per_s']} | "
                  f"{s['best_trained_tokens_per_s']} | {s['median_vs_padded_dataset_order']:.2f}x, "
                  f"{s['best_vs_padded_dataset_order']:.2f}x |")
    print(f"written {path}")


if __name__ == "__main__":
    main()
