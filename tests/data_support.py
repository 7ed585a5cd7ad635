"""Helpers for the data pipeline tests: a one-stage recipe around a data file, and running it."""
from __future__ import annotations

import json
from pathlib import Path

from runner.data.prepare import prepare_stage
from runner.recipe import Recipe

ROOT_DIR = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_recipe(recipe_dir: Path, data: dict, *, template: str | None = "llama-3", max_length: int = 512,
                train: dict | None = None, seed: int = 42) -> Recipe:
    """A validated one-stage recipe whose file would live in recipe_dir (relative data paths resolve there)."""
    recipe = Recipe.model_validate({
        "name": "t", "seed": seed,
        "model": {"base": "tiny", "chat_template": template, "max_seq_length": max_length},
        "stages": [{"name": "s", "data": {"val_size": 0, **data}, "train": train or {"max_steps": 1}}],
    })
    return recipe.read_from(recipe_dir / "recipe.yaml")


def prepare(recipe: Recipe, tokenizer, cache_dir: Path, logs: list | None = None):
    return prepare_stage(recipe, recipe.stages[0], tokenizer, cache_dir=cache_dir,
                         log=(logs.append if logs is not None else lambda _: None))


def trained_runs(example: dict, tokenizer) -> list[str]:
    """The decoded text of each contiguous run of trained-on tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def conversation(*turns: str, system: str | None = None) -> list[dict]:
    """user, assistant, user, ... turns as messages."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
