"""`tunebook export` and `tunebook compare`: what happens to a run after training."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..run_dir import COMPARE_DIR
from .options import err, out, writable


def export(
    run: Annotated[Path, typer.Argument(help="Run directory written by `tunebook train`.", show_default=False)],
    quant: Annotated[str | None, typer.Option(help="GGUF type(s), comma-separated: q8_0, f16, bf16, f32 (tunebook's "
                                              "writer), q6_k, q5_k_m, q4_k_m, q4_0, iq4_xs, ... (llama.cpp's quantizer); "
                                              "default: the recipe's export.quantization.")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip checking the GGUF against the merged model.")] = False,
    full_verify: Annotated[bool, typer.Option("--full-verify", help="Also load the GGUF back with transformers and "
                                              "compare logits (slow; ~4x the fp32 model in memory).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write the GGUF again even when it is up to date.")] = False,
) -> None:
    """Merge the final adapter into a full-precision base and write verified GGUFs with the chat template, each
    with an Ollama Modelfile beside it. Types already exported and up to date are kept."""
    from ..export.to_gguf import export_types

    quants = [q.strip() for q in quant.split(",") if q.strip()] if quant else None
    written = export_types(run, quants, verify=False if no_verify else None,
                           log=lambda m: err.print(m, highlight=False, markup=False),
                           verify_level="full" if full_verify else "standard", force=force or full_verify)
    for name, path in written.items():
        err.print(f"[green]exported[/green] {path}", highlight=False)
    first = next(iter(written))
    err.print(f"chat with it: tunebook chat {run}" + (f" --quant {first}" if quants else ""), highlight=False)


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to compare.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for report.md and the PNG plots.")] = COMPARE_DIR,
) -> None:
    """Write report.md (hyperparameters, lowest val loss, best perplexity, step of best, change between rows)
    and PNG curves of validation loss and perplexity per run and overlaid."""
    from ..measure.report import write_compare_report

    out.print(f"wrote {write_compare_report(runs, writable(out_dir, '--out', folder=True))}", highlight=False)
