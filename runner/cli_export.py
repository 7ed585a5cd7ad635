"""`tunebook export` and `tunebook compare`: what happens to a run after training."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export(
    run: Annotated[Path, typer.Argument(help="Run directory written by `tunebook train` (runs/<name>).", show_default=False)],
    quant: Annotated[str | None, typer.Option(help="q8_0 | f16 | f32 (default: the recipe's export.quantization).")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip checking the GGUF against the merged model.")] = False,
    full_verify: Annotated[bool, typer.Option("--full-verify", help="Also load the GGUF back with transformers and "
                                              "compare logits (slow; ~4x the fp32 model in memory).")] = False,
) -> None:
    """Merge the final adapter into a full-precision base and write a verified GGUF with the chat template."""
    from rich.console import Console

    from .export import export_run

    console = Console(stderr=True)
    out = export_run(run, quant=quant, verify=False if no_verify else None,
                     log=lambda m: console.print(m, highlight=False, markup=False),
                     verify_level="full" if full_verify else "standard")
    console.print(f"[green]exported[/green] {out}\nchat with it: tunebook chat {run}", highlight=False)


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to compare.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder for report.md and the PNG plots.")] = Path("runs/compare"),
) -> None:
    """Write report.md (hyperparameters, lowest val loss, best perplexity, step of best, change between rows)
    and PNG curves of validation loss and perplexity per run and overlaid."""
    from rich.console import Console

    from eval.report import write_compare_report

    from .errors import TunebookError

    for run in runs:
        if not (run / "recipe.yaml").is_file():
            raise TunebookError(f"{run} is not a tunebook run directory (no recipe.yaml)\n"
                                "    fix: pass folders written by `tunebook train`, e.g. runs/<name>")
    report = write_compare_report(runs, out)
    Console().print(f"wrote {report}", highlight=False)
