"""What a recipe will do before it does it: per stage, optimizer steps, effective batch, token budget."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..launch import world_size
from .schema import Recipe, SourceItem, StageConfig


@dataclass
class StagePlan:
    name: str
    init: str
    source: str
    optimizer_steps: int | None      # None when it depends on the dataset size (num_epochs)
    num_epochs: float | None
    effective_batch: int             # sequences per optimizer step, over all ranks
    max_tokens: int | None           # upper bound: steps x effective batch x max_seq_length
    learning_rate: float
    eval_every: int | None
    save_every: int | None


def stage_steps(stage: StageConfig, n_train_examples: int | None, ranks: int = 1) -> int | None:
    """Optimizer steps of a stage; for epochs this needs the number of training sequences."""
    t = stage.train
    if t.max_steps is not None:
        return t.max_steps
    if n_train_examples is None:
        return None
    per_step = t.micro_batch_size * t.gradient_accumulation_steps * ranks
    return max(1, math.ceil(n_train_examples * (t.num_epochs or 1) / per_step))


def describe_data(stage: StageConfig) -> str:
    """One source: its spec. A data list: each item with its weight (a share of trained tokens)."""
    if not isinstance(stage.data, list):
        return stage.data.source
    return " + ".join(f"{item.weight:g} {item.source if isinstance(item, SourceItem) else 'replay of ' + item.stage}"
                      for item in stage.data_items())


def plan(recipe: Recipe, ranks: int | None = None, n_train: dict[str, int] | None = None) -> list[StagePlan]:
    ranks = ranks or world_size()
    out = []
    for stage in recipe.stages:
        t = stage.train
        eff = t.micro_batch_size * t.gradient_accumulation_steps * ranks
        steps = stage_steps(stage, (n_train or {}).get(stage.name), ranks)
        out.append(StagePlan(
            name=stage.name, init=stage.init or "fresh", source=describe_data(stage),
            optimizer_steps=steps, num_epochs=t.num_epochs, effective_batch=eff,
            max_tokens=steps * eff * recipe.model.max_seq_length if steps else None,
            learning_rate=t.learning_rate, eval_every=t.eval_steps, save_every=t.save_steps,
        ))
    return out
