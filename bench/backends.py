"""A real peer side by side: tunebook's hf backend vs axolotl (`backend: axolotl`, axolotl 0.19 in its own
environment) on the same recipe, data and steps.

Quickstart (the default): recipes/quickstart.yaml shortened with --set as a user would: stage `general` on 600
ShareGPT conversations (validation 16), both stages `--max_steps=N` steps (default 6), no evaluation during
training and no export (throughput is the training's), `logging_steps 1`. Everything else is the recipe's: Gemma
3 270M in bf16 (`dtype: auto` on an AVX512-BF16/AMX CPU: bf16 weights + bf16 autocast on both sides), LoRA r16 on
all linear layers, the <end_of_turn> embedding row trained at its own learning rate, packed rows of 512
tokens, micro batch 4 x gradient accumulation 2. For each backend (hf first, then axolotl), each in its own child
processes:

- `tunebook train RECIPE --stage general`, then `--stage vet`: wall seconds of the command (start-up, model load,
  data, training, saving) and its peak RSS: the largest process of the command (os.wait4: the command and every
  process it waited for; for axolotl that is the `axolotl train` process);
- trained tokens: metrics.jsonl's `tokens_seen` at the last step (label-bearing tokens the trainer counted), over
  the trainer's own seconds (metrics.jsonl `seconds`: the training loop) and over the command's wall seconds;
- `tunebook train RECIPE` once more: it trains nothing and scores every stage's validation set after every stage
  with tunebook's evaluator (token-weighted, forgetting.json), the same code and samples for both backends.

    .venv/bin/python -m bench.backends --max_steps=6        # ~25 min on 2 idle cores; results/backends.json

Tiny (--tiny): the parity test's recipe (tests/train_support.quickstart_like: a tiny Llama, two stages, packed,
end-of-turn row trained) under both backends at several seeds, scored by the forgetting matrix: how far apart hf
and axolotl land at the same seed, against how far the hf backend moves with the seed alone. This is the
measurement behind the tolerance of tests/test_backend_axolotl.py::test_parity_with_the_hf_backend.

    .venv/bin/python -m bench.backends --tiny --seeds 7 8 9  # ~10 min; results/backends_tiny.json

axolotl runs from .venv-axolotl (make env-axolotl) or $TUNEBOOK_AXOLOTL. unsloth needs a GPU: not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import ROOT

BACKENDS = ("hf", "axolotl")
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def shortened(steps: int, output_dir: Path, backend: str) -> list[str]:
    """The --set overrides of the quickstart run, the same for both backends but `backend`."""
    sets = [f"backend={backend}", f"output_dir={output_dir}", "stages.0.data.max_samples=600",
            "stages.0.data.val_size=16", "export=null", "eval=null", "targets=null"]
    for i in (0, 1):
        sets += [f"stages.{i}.train.max_steps={steps}", f"stages.{i}.train.eval_steps=null",
                 f"stages.{i}.train.save_steps=null", f"stages.{i}.train.logging_steps=1"]
    return [arg for s in sets for arg in ("--set", s)]


def measured(cmd: list[str], log_path: Path) -> dict:
    """Run a command; its wall seconds, exit status and peak RSS (its largest process, waited-for children
    included: Linux's wait4 reports the maximum of the process and its descendants)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "exit": proc.returncode}


def last_training_row(metrics: Path) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("loss") is not None][-1]


def quickstart_side(backend: str, steps: int, folder: Path) -> dict:
    sets = shortened(steps, folder, backend)
    tunebook = [sys.executable, "-m", "runner.cli", "train", str(RECIPE)]
    side: dict = {"backend": backend, "stages": {}}
    for stage in ("general", "vet"):
        print(f"{backend}: training stage {stage}", flush=True)
        run = measured(tunebook + ["--stage", stage] + sets, folder / f"{backend}-{stage}.log")
        if run["exit"] != 0:
            raise SystemExit(f"{backend} stage {stage} failed (exit {run['exit']}): see {folder / f'{backend}-{stage}.log'}")
        row = last_training_row(folder / "quickstart" / stage / "metrics.jsonl")
        run.update({"steps": row["step"], "trained_tokens": row["tokens_seen"], "trainer_s": row["seconds"],
                    "trained_tokens_per_s_trainer": round(row["tokens_seen"] / row["seconds"], 1),
                    "trained_tokens_per_s_wall": round(row["tokens_seen"] / run["wall_s"], 1),
                    "last_loss": row["loss"]})
        side["stages"][stage] = run
    print(f"{backend}: scoring every stage with tunebook's evaluator", flush=True)
    run = measured(tunebook + sets, folder / f"{backend}-score.log")
    if run["exit"] != 0:
        raise SystemExit(f"{backend} scoring failed: see {folder / f'{backend}-score.log'}")
    side["forgetting"] = json.loads((folder / "quickstart" / "forgetting.json").read_text())
    return side


def quickstart(steps: int, keep: Path | None) -> dict:
    sides = {}
    for backend in BACKENDS:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{backend}-", dir=keep))
        sides[backend] = quickstart_side(backend, steps, folder)
    hf, ax = sides["hf"], sides["axolotl"]
    ratios = {}
    for stage in ("general", "vet"):
        a, b = ax["stages"][stage], hf["stages"][stage]
        ratios[stage] = {
            "trained_tokens_per_s_trainer": common.ratio(a["trained_tokens_per_s_trainer"],
                                                         b["trained_tokens_per_s_trainer"]),
            "trained_tokens_per_s_wall": common.ratio(a["trained_tokens_per_s_wall"], b["trained_tokens_per_s_wall"]),
            "peak_rss": common.ratio(a["peak_rss_mib"], b["peak_rss_mib"])}
    ppl = {backend: sides[backend]["forgetting"]["ppl"] for backend in BACKENDS}
    return {"mode": "quickstart", "steps": steps, "sides": sides, "axolotl_over_hf": ratios, "ppl": ppl}


def tiny(seeds: list[int]) -> dict:
    """Forgetting-matrix losses of the parity recipe under both backends at each seed."""
    sys.path.insert(0, str(ROOT / "tests"))
    from train_support import quickstart_like

    from runner.pipeline import train_recipe
    from runner.recipe import load_recipe
    from runner.run_dir import RunDir

    losses: dict = {"hf": {}, "axolotl": {}}
    for seed in seeds:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-parity-{seed}-"))
        path = quickstart_like(folder, seed=seed)
        for backend in BACKENDS:
            print(f"seed {seed}: {backend}", flush=True)
            recipe = load_recipe(path, [f"backend={backend}", f"name={backend}"])
            train_recipe(recipe, log=lambda m: None)
            losses[backend][seed] = json.loads(RunDir.of(recipe).forgetting_file.read_text())["loss"]
    cells = [(after, scored) for after in ("general", "vet") for scored in ("general", "vet")]
    gap = {f"{a}/{s}": [round(abs(losses["hf"][seed][a][s] - losses["axolotl"][seed][a][s]), 4) for seed in seeds]
           for a, s in cells}
    spread = {backend: {f"{a}/{s}": round(max(losses[backend][x][a][s] for x in seeds)
                                          - min(losses[backend][x][a][s] for x in seeds), 4) for a, s in cells}
              for backend in BACKENDS}
    gain = {backend: {s: [round(losses[backend][x]["base"][s] - losses[backend][x][s][s], 4) for x in seeds]
                      for s in ("general", "vet")} for backend in BACKENDS}
    return {"mode": "tiny", "seeds": seeds, "losses": losses, "hf_vs_axolotl_same_seed": gap,
            "max_gap": max(max(v) for v in gap.values()), "seed_spread": spread,
            "max_seed_spread_hf": max(spread["hf"].values()), "gain_over_base": gain}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_steps", type=int, default=6, help="optimizer steps of each quickstart stage")
    parser.add_argument("--tiny", action="store_true", help="the parity test's tiny recipe at several seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--keep", type=Path, help="keep the quickstart runs under this folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    info = common.machine()
    if args.tiny:
        result = tiny(args.seeds)
        path = common.write_result("backends_tiny", result, info)
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))
    else:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        result = quickstart(args.max_steps, args.keep)
        path = common.write_result("backends", result, info)
        print(json.dumps({k: v for k, v in result.items() if k != "sides"}, indent=1))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
