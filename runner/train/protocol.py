"""The protocol every training backend follows: a StageJob in (recipe, stage, its folder, the base, the stage
it starts from, the tokenized data), a StageOutcome out (saved as stage.json).

Every backend leaves the same things behind in the stage's folder (runner/run_dir.py): adapter/,
metrics.jsonl and stage.json, so eval, export, compare and chat never need to know which one trained a stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from ..recipe import Recipe, StageConfig
from ..run_dir import StageDir, StageOutcome

@dataclass
class StageJob:
    """Everything a backend needs to train one stage."""

    recipe: Recipe
    stage: StageConfig
    dir: StageDir                     # where its adapter, metrics and stage.json go
    model_ref: str                    # the base as from_pretrained takes it (folder, .gguf file or hub id)
    previous: StageOutcome | None     # the stage it starts from (None for the first, or init: fresh)
    data: object                      # runner.data.prepare.StageData: tokenized train and validation samples
    tokenizer: object                 # with the recipe's chat template set
    log: Callable[[str], object] = print

    @property
    def lineage(self) -> list[str]:
        """The adapters merged into this stage's base (earlier `merge` stages)."""
        return self.previous.lineage_after(self.stage.init) if self.previous else []


class Backend(Protocol):
    name: str

    def check(self, recipe: Recipe) -> None:
        """Refuse early, before anything is loaded, when this machine cannot run the recipe."""

    def run_stage(self, job: StageJob) -> StageOutcome:
        """Train one stage and save its outcome (stage.json); an interrupted stage raises Interrupted."""
