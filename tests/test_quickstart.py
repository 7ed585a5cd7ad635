"""The quickstart pipeline, shortened: the real Gemma 3 270M and the real ShareGPT and vet data, a few steps
per stage, then the forgetting matrix, merge, Q8_0 export with verification, the quality checks, the evaluation
gate (4 of its questions) and the report; a rerun redoes none of it. `make demo` runs the same recipe at full length."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

SHORT = [
    "stages.0.data.max_samples=600", "stages.0.data.val_size=8",
    "stages.0.train.max_steps=3", "stages.0.train.eval_steps=3", "stages.0.train.save_steps=3",
    "stages.0.train.gradient_accumulation_steps=1",
    "stages.1.data.0.val_size=4", "stages.1.train.num_epochs=null",
    "stages.1.train.max_steps=3", "stages.1.train.eval_steps=3", "stages.1.train.save_steps=3",
    "stages.1.train.gradient_accumulation_steps=1",
]


def train(out_dir) -> str:
    # the gate on the first 4 questions of the evaluation set, answers cut at 24 tokens
    eval_set = out_dir / "vet_eval-4.jsonl"
    eval_set.write_text("".join((ROOT / "data" / "vet_eval.jsonl").read_text().splitlines(keepends=True)[:4]))
    sets = [f"--set={s}" for s in SHORT + ["name=qs-ci", f"output_dir={out_dir}", f"eval.data={eval_set}",
                                           "eval.max_tokens=24"]]
    done = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"), *sets],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_shortened_quickstart_end_to_end(tmp_path):
    log = train(tmp_path)
    run = tmp_path / "qs-ci"
    for stage in ("general", "vet"):
        assert (run / stage / "adapter" / "adapter_config.json").is_file()
        assert json.loads((run / stage / "stage.json").read_text())["steps"] == 3

    matrix = json.loads((run / "forgetting.json").read_text())
    assert matrix["rows"] == ["base", "general", "vet"] and matrix["stages"] == ["general", "vet"]
    assert all(math.isfinite(matrix["ppl"][r][s]) and matrix["ppl"][r][s] > 1 for r in matrix["rows"] for s in matrix["stages"])
    assert matrix["ppl"]["general"]["general"] < matrix["ppl"]["base"]["general"]  # three steps already help

    gguf = run / "qs-ci-q8_0.gguf"
    assert gguf.stat().st_size > 100_000_000
    assert "verified" in log

    quality = json.loads((run / "quality.json").read_text())
    q = quality["quantization"]
    assert quality["stage"] == "vet" and quality["val_examples"] == 4
    assert 1 < q["merged_ppl"] and abs(q["relative"] - (q["gguf_ppl"] - q["merged_ppl"]) / q["merged_ppl"]) < 1e-12
    assert abs(q["relative"]) < 0.15  # the same model (a wrong export is off by far more); the 1% bar is for the full run
    g = quality["generation"]
    assert g["questions"] == 4 and len(g["answers"]) == 4
    assert g["stopped"] == sum(a["stopped"] for a in g["answers"]) and g["stop_rate"] == g["stopped"] / 4
    assert all(a["stopped"] or a["tokens"] == g["max_tokens"] for a in g["answers"])  # only a full answer is cut
    assert g["same_prompt_as_training"] == 4  # the GGUF's template renders exactly the training prompt
    assert all(a["answer"] and 0 < a["tokens"] <= 256 for a in g["answers"])

    gate = {m: json.loads((run / "gate" / f"{m}.json").read_text()) for m in ("served", "base", "general")}
    assert gate["served"]["questions"] == 4 and set(gate["served"]) >= {"greedy", "chat", "reference_ppl"}
    assert all(len(g["greedy"]["answers"]) == 4 and g["reference_ppl"]["ppl"] > 1 for g in gate.values())
    assert not list((run / "gate").glob("*.gguf"))  # the stage models were exported only to be measured

    report = (run / "report.md").read_text()
    for heading in ("Forgetting matrix", "Targets", "Run time", "Evaluation gate: questions never trained on",
                    "Quantization check", "In-distribution sample answers"):
        assert f"## {heading}" in report
    assert "vet_eval-4.jsonl, chat sampler: answers with a forbidden phrase (≤ 0)" in report
    assert f"{q['gguf_ppl']:.4f}" in report and f"{g['stopped']}/4" in report
    assert "fewer than 40" in report
    assert "Wall time of the command that trained every stage" in report

    # a rerun trains nothing, exports nothing and keeps the report
    before = {p: p.stat().st_mtime for p in (gguf, run / "report.md", run / "quality.json", *(run / "gate").glob("*"))}
    log = train(tmp_path)
    assert "export is up to date" in log and "quality checks are up to date" in log and "report is up to date" in log
    assert "gate of served is up to date" in log and "gate of general is up to date" in log
    assert "forgetting matrix is up to date" in log and "merged model is up to date" in log
    assert {p: p.stat().st_mtime for p in before} == before
