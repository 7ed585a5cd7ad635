"""Unpacked stages draw batches of similar length (transformers' length-grouped sampler, seeded): far less
padding than random batches, every sample once per epoch. Packed stages keep random order (rows are full)."""
from __future__ import annotations

import random

import pytest
from datasets import Dataset
from transformers import Trainer

from runner.data.pack import make_collator
from runner.recipe import load_recipe
from runner.run_dir import StageDir
from runner.train.hf_trainer import sft_config
from tiny_models import make_tiny_llama, make_tokenizer
from train_support import two_stage_recipe


def _examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([8, 16, 40, 100, 120])
        ids = [5 + (i + j) % 50 for j in range(length)]
        out.append({"input_ids": ids, "labels": ids})
    return out


def _waste(batches) -> float:
    slots = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1 - real / slots


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampling")
    tokenizer = make_tokenizer(folder / "tok")
    model = make_tiny_llama(folder / "tiny", tokenizer)
    recipe = load_recipe(two_stage_recipe(folder))
    return folder, recipe, model, tokenizer


def _batches(setup, packing: bool):
    folder, recipe, model, tokenizer = setup
    stage = recipe.stages[0].model_copy(update={"train": recipe.stages[0].train.model_copy(update={"packing": packing})})
    args = sft_config(recipe, stage, StageDir(folder / ("packed" if packing else "plain")), autocast_bf16=False)
    data = _examples(96)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(data), eval_dataset=Dataset.from_list(data[:4]),
                      data_collator=make_collator(tokenizer, packing=False, max_length=128), processing_class=tokenizer)
    return args, data, list(trainer.get_train_dataloader())


def test_unpacked_batches_are_length_grouped(setup):
    args, data, batches = _batches(setup, packing=False)
    assert args.train_sampling_strategy == "group_by_length"
    assert sum(len(b["input_ids"]) for b in batches) == len(data)  # every sample once
    random.seed(1)
    shuffled = random.sample(data, len(data))
    collate = make_collator(setup[3], packing=False, max_length=128)
    random_waste = _waste([collate(shuffled[i:i + 4]) for i in range(0, len(shuffled), 4)])
    assert _waste(batches) < 0.1 < random_waste


def test_packed_stages_keep_random_order(setup):
    args, _, _ = _batches(setup, packing=True)
    assert args.train_sampling_strategy == "random"
