"""`tunebook eval`: loss, perplexity, tokens scored and tokens/s for a run, adapter, model folder or GGUF."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def eval_(
    target: Annotated[Path, typer.Argument(help="Run dir, adapter dir, model dir or .gguf file.", show_default=False)],
    recipe: Annotated[Path | None, typer.Option(help="Recipe whose stage validation set to score.")] = None,
    stage: Annotated[str | None, typer.Option(help="Stage of --recipe (default: the last); STAGE/SOURCE for one "
                                                   "validation set of a stage with several.")] = None,
    data: Annotated[str | None, typer.Option(help="Score a whole data source instead (file, folder, hub id, package:).")] = None,
    quant: Annotated[str | None, typer.Option(help="Score the run's GGUF of this type (q8_0, q4_k_m, ...) instead "
                                              "of its final adapter.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass (the result does not depend on it).")] = 4,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object, for scripts.")] = False,
) -> None:
    """Token-weighted perplexity: exp(total NLL / scored tokens) over assistant tokens, padding never scored."""
    from rich.console import Console
    from rich.table import Table

    from ..measure.evaluate import evaluate_target

    err = Console(stderr=True, soft_wrap=True)
    result = evaluate_target(target, recipe, stage, data, batch_size, quant=quant,
                             log=lambda m: err.print(m, highlight=False, markup=False))
    if json_:
        print(json.dumps(result))
        return
    table = Table(title=f"{result['target']} ({result['kind']}) on {result['data']}", title_justify="left")
    for col in ("loss", "perplexity", "tokens scored", "examples", "tokens/s"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['loss']:.4f}", f"{result['ppl']:.3f}", f"{result['tokens']:,}", f"{result['examples']:,}",
                  f"{result['tokens_per_s']:,.0f}")
    Console().print(table)
