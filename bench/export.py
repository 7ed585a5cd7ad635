"""export: seconds and peak RSS of the 270M Q8_0 export (tunebook's `export_run`: merge the adapter, write the
Q8_0 GGUF, verify it). Targets: <= 60 s, peak RSS <= 2x the fp32 model size (parameter count x 4 bytes).

    .venv/bin/python bench/export.py              # -> bench/results/export.json
    .venv/bin/python bench/export.py --rounds 1

Each round makes a fresh copy of what export needs from runs/quickstart (recipe.yaml, the final stage's
stage.json and adapter; stage.json's adapter path is pointed at the copy) in a temp dir, so the merge is
really done, and runs in its own spawned child process (bench.common.in_child, for its own peak RSS):
  * floor: `AutoModelForCausalLM.from_pretrained(merged, dtype=float32)` and one read of every weight
    (transformers maps safetensors lazily; the sum makes it read them): the merged model loaded once, the
    least any export that reads the model must do. Its seconds and peak RSS are the baseline;
  * export: `runner.export.export_run(copy, quant="q8_0")`, verification on (what `tunebook export` does);
    merge, write and verify seconds are timed separately by wrapping `runner.export.gguf_writer.write_gguf` and
    `runner.export.gguf_verify.verify_gguf`, which export_run imports at call time; peak RSS after each phase;
  * export with verify=False (merge + write only), for the peak RSS of those two phases on their own.
The three take turns (forward order, then reversed), so a busy shared machine slows them alike; the table
gives each one's fastest round and the ratio to the floor's fastest round. Every child imports torch,
transformers, peft and gguf before its clock starts, so import time is in none of them.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, in_child, machine, ratio, write_result

RUN = ROOT / "runs" / "quickstart"
TARGET_SECONDS = 60.0
TARGET_RSS_RATIO = 2.0


# --- pure computations (tested in tests/test_bench_inference_export.py) -------------------------------

def fp32_mib(n_params: int) -> float:
    """The fp32 model size: parameter count x 4 bytes, in MiB."""
    return n_params * 4 / 2**20


def rss_ratio(peak_rss_mib: float, n_params: int) -> float:
    """Peak RSS as a multiple of the fp32 model size."""
    return round(peak_rss_mib / fp32_mib(n_params), 2) if n_params else float("nan")


# --- what each child does -----------------------------------------------------------------------------

def _rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _preload() -> None:
    import gguf  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import runner.export  # noqa: F401
    import runner.export.gguf_writer  # noqa: F401
    import runner.export.gguf_verify  # noqa: F401
    try:
        from chat import llama_runtime

        llama_runtime.load()
    except Exception:  # noqa: BLE001 - verification says it skipped llama.cpp
        pass


def load_floor(merged_dir: str) -> dict:
    """The baseline: load the merged model in fp32 once."""
    _preload()
    import torch
    from transformers import AutoModelForCausalLM

    rss_before = _rss_mib()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    load_s = time.perf_counter() - start
    with torch.no_grad():  # safetensors are mapped lazily: read every weight once, as any export must
        for p in model.parameters():
            p.sum()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "from_pretrained_s": round(load_s, 2), "n_params": sum(p.numel() for p in model.parameters()),
            "rss_after_imports_mib": rss_before}


def export_child(run_copy: str, verify: bool) -> dict:
    """tunebook's export_run on a run copy, with merge / write / verify timed and peak RSS after each."""
    _preload()
    import runner.export.gguf_writer
    import runner.export.gguf_verify
    from runner.export.to_gguf import export_run

    marks: dict = {}
    real_write, real_verify = runner.export.gguf_writer.write_gguf, runner.export.gguf_verify.verify_gguf

    def write_gguf(*args, **kwargs):
        marks["write_start"], marks["rss_before_write"] = time.perf_counter(), _rss_mib()
        try:
            return real_write(*args, **kwargs)
        finally:
            marks["write_end"], marks["rss_after_write"] = time.perf_counter(), _rss_mib()

    def verify_gguf(*args, **kwargs):
        marks["verify_start"] = time.perf_counter()
        try:
            report = real_verify(*args, **kwargs)
            marks["report"] = {k: report.get(k) for k in ("quant", "n_tokens")} | {
                b: {k: report[b].get(k) for k in ("rel_max_diff", "argmax_agreement", "n_tensors", "n_bytes", "ok",
                                                   "skipped") if k in report[b]}
                for b in ("tensors", "transformers", "llama.cpp") if isinstance(report.get(b), dict)}
            return report
        finally:
            marks["verify_end"], marks["rss_after_verify"] = time.perf_counter(), _rss_mib()

    runner.export.gguf_writer.write_gguf, runner.export.gguf_verify.verify_gguf = write_gguf, verify_gguf
    rss_before = _rss_mib()
    lines: list[str] = []
    start = time.perf_counter()
    out = export_run(Path(run_copy), quant="q8_0", verify=verify, log=lines.append)
    total = time.perf_counter() - start
    result = {"total_s": round(total, 2), "merge_s": round(marks["write_start"] - start, 2),
              "write_s": round(marks["write_end"] - marks["write_start"], 2),
              "rss_after_imports_mib": rss_before, "rss_after_merge_mib": marks["rss_before_write"],
              "rss_after_write_mib": marks["rss_after_write"], "gguf_bytes": out.stat().st_size, "log": lines}
    if verify:
        result |= {"verify_s": round(marks["verify_end"] - marks["verify_start"], 2),
                   "rss_after_verify_mib": marks["rss_after_verify"], "verification": marks.get("report")}
    return result


def copy_for_export(run: Path, dest: Path) -> Path:
    """What export_run reads from a run directory: recipe.yaml, the final stage's stage.json, its adapter
    and the adapters of its lineage (paths rewritten to the copies). merged/ is not copied: export merges."""
    from runner.run_dir import RunDir, StageDir

    recipe = RunDir(run).load_recipe()
    dest.mkdir(parents=True)
    shutil.copy2(run / "recipe.yaml", dest / "recipe.yaml")
    last = recipe.stages[-1].name
    outcome = StageDir(run / last).outcome()  # paths resolved, whichever way stage.json stored them

    def copied(adapter: str, i: int) -> str:
        src = Path(adapter)
        if not (src / "adapter_config.json").is_file():
            sys.exit(f"{src} (an adapter named in {run / last / 'stage.json'}) is missing: run `make demo` first")
        target = dest / last / ("adapter" if i < 0 else f"lineage-{i}")
        shutil.copytree(src, target)
        return str(target)

    outcome.lineage = [copied(a, i) for i, a in enumerate(outcome.lineage)]
    outcome.adapter = copied(outcome.adapter, -1)
    StageDir(dest / last).save_outcome(outcome)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    if not (RUN / "recipe.yaml").is_file() or not (RUN / "merged" / "model.safetensors").is_file():
        sys.exit(f"{RUN} has no finished run with a merged model: run `make demo` first")
    info = machine()
    runs = {"floor": [], "export": [], "export_no_verify": []}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        merged = tmp / "merged-floor"
        shutil.copytree(RUN / "merged", merged)
        sides = list(runs)
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                if side == "floor":
                    res = in_child(load_floor, str(merged))
                else:
                    copy = copy_for_export(RUN, tmp / f"run-{r}-{side}")
                    res = in_child(export_child, str(copy), side == "export")
                    shutil.rmtree(copy)
                runs[side].append(res)
                print(f"round {r}: {side}: " + json.dumps({k: v for k, v in res.items() if k not in ("log", "verification")}),
                      flush=True)

    n_params = runs["floor"][0]["n_params"]
    best = {side: min(results, key=lambda x: x.get("total_s", x.get("seconds"))) for side, results in runs.items()}
    floor_s = best["floor"]["seconds"]
    peak_export = max(x["peak_rss_mib"] for x in runs["export"])
    peak_no_verify = max(x["peak_rss_mib"] for x in runs["export_no_verify"])
    exp = best["export"]
    table = {
        "floor: load merged fp32 and read every weight (transformers)": {"seconds": floor_s, "vs_floor": 1.0,
                                                    "peak_rss_mib": max(x["peak_rss_mib"] for x in runs["floor"])},
        "export (merge + write + verify)": {
            "seconds": exp["total_s"], "vs_floor": ratio(exp["total_s"], floor_s),
            "merge_s": exp["merge_s"], "write_s": exp["write_s"], "verify_s": exp["verify_s"],
            "seconds_median": statistics.median(x["total_s"] for x in runs["export"]),
            "peak_rss_mib": peak_export, "peak_rss_vs_fp32": rss_ratio(peak_export, n_params),
            "rss_after_merge_mib": exp["rss_after_merge_mib"], "rss_after_write_mib": exp["rss_after_write_mib"],
            "rss_after_verify_mib": exp["rss_after_verify_mib"]},
        "export, verify=False (merge + write)": {
            "seconds": best["export_no_verify"]["total_s"], "vs_floor": ratio(best["export_no_verify"]["total_s"], floor_s),
            "merge_s": best["export_no_verify"]["merge_s"], "write_s": best["export_no_verify"]["write_s"],
            "peak_rss_mib": peak_no_verify, "peak_rss_vs_fp32": rss_ratio(peak_no_verify, n_params)},
    }
    result = {
        "what": "tunebook export_run on a copy of runs/quickstart (Gemma 3 270M + LoRA): merge, Q8_0 GGUF, verify; "
                "seconds and peak RSS in a spawned child, against loading the merged model in fp32 once",
        "n_params": n_params, "fp32_mib": round(fp32_mib(n_params), 1), "rounds": args.rounds,
        "gguf_bytes": exp["gguf_bytes"], "verification": exp.get("verification"),
        "table": table, "runs": {side: [{k: v for k, v in x.items() if k != "log"} for x in results]
                                 for side, results in runs.items()},
        "targets": {
            "seconds": {"measured": exp["total_s"], "target": TARGET_SECONDS, "met": exp["total_s"] <= TARGET_SECONDS},
            "peak_rss_vs_fp32": {"measured": rss_ratio(peak_export, n_params), "target": TARGET_RSS_RATIO,
                                 "met": rss_ratio(peak_export, n_params) <= TARGET_RSS_RATIO},
        },
    }
    path = write_result("export", result, info)
    for name, row in table.items():
        print(f"{name}: {json.dumps(row)}")
    print(f"fp32 model {fp32_mib(n_params):.0f} MiB ({n_params:,} parameters); wrote {path}")


if __name__ == "__main__":
    main()
