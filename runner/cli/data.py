"""`tunebook data RECIPE`: what each stage's data becomes, before any training.

Prints every stage's report (records, skips and why, lengths, split, trainable tokens, packing), per source,
then the training mix of a stage with several sources or replay (samples and trained tokens per item), and,
with --show N, N training samples with the trained-on tokens marked ⟦like this⟧ (and highlighted).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from eval.labels import IGNORE_INDEX

from .options import SetOpt

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

TRAINED_STYLE = "bold green"


def render_example(example: dict, tokenizer) -> Text:
    """The sample's text, trained-on spans wrapped in ⟦…⟧ and styled."""
    text = Text()
    ids, labels = example["input_ids"], example["labels"]
    start = 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and (labels[i] != IGNORE_INDEX) == (labels[start] != IGNORE_INDEX):
            continue
        piece = tokenizer.decode(ids[start:i], skip_special_tokens=False)
        if labels[start] != IGNORE_INDEX:
            text.append("⟦", style="dim")
            text.append(piece, style=TRAINED_STYLE)
            text.append("⟧", style="dim")
        else:
            text.append(piece)
        start = i
    return text


StageOpt = Annotated[str | None, typer.Option("--stage", help="Only this stage.")]
ShowOpt = Annotated[int, typer.Option("--show", help="Print N training samples, trained-on tokens marked ⟦…⟧.")]


def data(recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
         stage: StageOpt = None, show: ShowOpt = 0, set_: SetOpt = None) -> None:
    """Load, check and tokenize each stage's data; print its statistics (and, with --show, samples)."""
    from ..data.prepare import prepare_stage
    from ..data.report import render_mix, render_report
    from ..model.base import load_tokenizer
    from ..recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    stages = [loaded.stage(stage)] if stage else loaded.stages
    err.print(f"loading the tokenizer of {loaded.model.base}", style="dim")
    tokenizer = load_tokenizer(loaded.model, base_dir=loaded.base_dir)
    for s in stages:
        result = prepare_stage(loaded, s, tokenizer, log=lambda msg: err.print(msg, style="dim"))
        several = len(result.reports) > 1
        for item, report in zip(s.sources(), result.reports):
            out.print(render_report(report, f"stage {s.name}, source {item.name}" if several else None))
        if len(result.mix.parts) > 1:
            out.print(render_mix(s.name, result.mix))
        for i, example in enumerate(result.train[:show]):
            out.rule(f"stage {s.name}, training sample {i + 1} ({len(example['input_ids'])} tokens)")
            out.print(render_example(example, tokenizer))
        out.print()
