"""gguf_types: what each GGUF type costs on the quickstart model, and which tensors cost it.

On a finished quickstart run (`--run`, default runs/quickstart), against the merged model's perplexity (torch,
float32) on the last stage's validation set, the same scored tokens for every row:

* GGUF files written by tunebook's export code into a temp dir (never into the run): the writer's f32, bf16,
  q8_0; q8_0 with the embedding kept at f32 / f16 / bf16 (export.embedding_type); f32 with only the embedding
  at q8_0; llama.cpp's q6_k, q5_k_m, q4_k_m (and q4_k_m with the embedding at f16). Gemma 3 ties its output
  head to the embedding: in a GGUF the one tensor is both. Each row: file size, the stored type of the
  embedding, perplexity (llama.cpp) and its change over the merged model.
* The two roles of the tied tensor, apart (torch, the head untied in memory): only the input embedding rows
  rounded to Q8_0, only the output head rounded, both.

Perplexity is deterministic, so this measures quality, not speed: one pass, no rounds. The export code is
what `tunebook export` runs (runner.export); the run is only read.

    .venv/bin/python -m bench.gguf_types                       # -> bench/results/gguf_types.json, .md
    .venv/bin/python -m bench.gguf_types --run /tmp/x/quickstart
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, machine, write_result

RUN = ROOT / "runs" / "quickstart"
# (label, GGUF type, export.embedding_type)
FILES = (
    ("f32", "f32", None),
    ("bf16", "bf16", None),
    ("q8_0", "q8_0", None),
    ("q8_0, embedding f32", "q8_0", "f32"),
    ("q8_0, embedding f16", "q8_0", "f16"),
    ("q8_0, embedding bf16", "q8_0", "bf16"),
    ("f32, embedding q8_0", "f32", "q8_0"),
    ("q6_k", "q6_k", None),
    ("q5_k_m", "q5_k_m", None),
    ("q4_k_m", "q4_k_m", None),
    ("q4_k_m, embedding f16", "q4_k_m", "f16"),
)


def relative(ppl: float, reference: float) -> float:
    return (ppl - reference) / reference


def validation_set(run):
    """The last stage's validation examples, tokenized as training did (the data cache makes this quick)."""
    from transformers import AutoTokenizer

    from runner.data.prepare import prepare_stage

    recipe = run.load_recipe()
    tokenizer = AutoTokenizer.from_pretrained(run.merged)
    tokenizer.chat_template = (run.merged / "chat_template.jinja").read_text()
    return prepare_stage(recipe, recipe.stages[-1], tokenizer, log=lambda m: None).val


def write_file(merged: Path, out: Path, quant: str, embedding: str | None, source: Path | None) -> Path:
    from runner.export.gguf_table import read_table
    from runner.export.gguf_writer import QUANTS, kept_types, write_gguf
    from runner.export.llama_quant import quantize_gguf

    keep = {"embedding": embedding} if embedding else {}
    template = (merged / "chat_template.jinja").read_text()
    if quant in QUANTS:
        return write_gguf(merged, out, quant, chat_template=template, keep=keep)
    kept = kept_types([t.name for t in read_table(source)[1]], keep)
    return quantize_gguf(source, out, quant, kept, log=lambda m: None)


def embedding_type(path: Path) -> str:
    from runner.export.gguf_table import read_table

    return next(t.qtype.name for t in read_table(path)[1] if t.name == "token_embd.weight")


def torch_roles(merged: Path, val: list[dict]) -> dict:
    """Perplexity with the tied tensor rounded to Q8_0 in one role at a time (the head untied in memory)."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from eval.perplexity import evaluate_torch

    def q8(w: torch.Tensor) -> torch.Tensor:
        data = w.detach().float().numpy()
        back = gguf.quants.dequantize(gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                                      gguf.GGMLQuantizationType.Q8_0)
        return torch.from_numpy(np.ascontiguousarray(back).reshape(data.shape))

    out = {}
    for role in ("input embedding", "output head", "both"):
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if not model.config.tie_word_embeddings:
            return {}  # two tensors already: the file rows above measure each
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())  # untied: two tensors
        with torch.no_grad():
            if role in ("input embedding", "both"):
                embed.weight.copy_(q8(embed.weight))
            if role in ("output head", "both"):
                head.weight.copy_(q8(head.weight))
        out[role] = evaluate_torch(model, val, batch_size=4, progress=False).ppl
        del model
        gc.collect()
    return out


def table(result: dict) -> str:
    ref = result["merged_ppl"]
    lines = [f"Merged model (torch, float32): vet val perplexity **{ref:.4f}** over {result['tokens']:,} scored tokens.",
             "", "| file | embedding (= output head) stored as | size | vet val ppl | vs merged |",
             "|---|---|---|---|---|"]
    for row in result["files"]:
        lines.append(f"| {row['label']} | {row['embedding']} | {row['mib']:.0f} MiB | {row['ppl']:.4f} | "
                     f"{relative(row['ppl'], ref) * 100:+.2f}% |")
    lines += ["", "The tied tensor's two roles apart (torch, head untied in memory, rounded to Q8_0):", "",
              "| rounded to Q8_0 | vet val ppl | vs merged |", "|---|---|---|"]
    for role, ppl in result["torch_roles"].items():
        lines.append(f"| {role} | {ppl:.4f} | {relative(ppl, ref) * 100:+.2f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=RUN)
    args = parser.parse_args(argv)

    from eval.perplexity import evaluate_gguf
    from runner.export.to_gguf import stored_dtype
    from runner.measure.quality import merged_perplexity
    from runner.run_dir import RunDir

    run = RunDir(args.run).require()
    if not (run.merged / "config.json").is_file():
        print(f"{run.merged} is missing: train and export the run first (make demo)", file=sys.stderr)
        return 2
    info = machine()
    val = validation_set(run)
    start = time.perf_counter()
    reference = merged_perplexity(run.merged, val)
    result = {"run": str(run.path), "merged_ppl": reference.ppl, "tokens": reference.tokens, "files": []}
    print(f"merged: ppl {reference.ppl:.4f} ({reference.tokens} tokens)", flush=True)
    with tempfile.TemporaryDirectory(prefix="gguf-types-") as tmp:
        source = write_file(run.merged, Path(tmp) / "source.gguf", stored_dtype(run.merged), None, None)
        for label, quant, embedding in FILES:
            path = write_file(run.merged, Path(tmp) / f"{label.replace(', ', '-').replace(' ', '_')}.gguf", quant,
                              embedding, source)
            ppl = evaluate_gguf(path, val, progress=False).ppl
            row = {"label": label, "quant": quant, "embedding_type": embedding, "embedding": embedding_type(path),
                   "mib": round(path.stat().st_size / 2**20, 1), "ppl": ppl}
            result["files"].append(row)
            print(f"{label}: {row['mib']:.0f} MiB, embedding {row['embedding']}, ppl {ppl:.4f} "
                  f"({relative(ppl, reference.ppl) * 100:+.2f}%)", flush=True)
            path.unlink()
    result["torch_roles"] = torch_roles(run.merged, val)
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_result("gguf_types", result, info)
    text = table(result)
    (ROOT / "bench" / "results" / "gguf_types.md").write_text(
        "# GGUF types on the quickstart model: size against perplexity, and which tensors cost it\n\n"
        f"`python -m bench.gguf_types` on {info['cpu']} ({info['logical_cores']} cores).\n\n" + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
