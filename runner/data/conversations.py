"""The conversations behind a stage's samples, for a trainer that tokenizes them itself (axolotl): the same
conversations prepare.py turns into samples, in the same split, and for a stage with several items the same
training mix (the same draws, the same repeats, the same order).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TunebookError
from ..recipe import DataConfig, Recipe, ReplayItem, StageConfig
from .prepare import prepare_stage, read_conversations
from .report import DataReport
from .sources import BadRecords, open_source
from .split import shuffled, split_indices
from .templates import resolve_chat_template
from .tokenize import tokenize_conversations


def source_conversations(recipe: Recipe, stage: StageConfig, cfg: DataConfig, tokenizer=None) -> tuple[list, list]:
    """One source's conversations as prepare.py reads them (format, system prompt, shuffle, max_samples). With a
    tokenizer: (train, val) exactly as prepare.py chooses its samples (same length policy, same split). Without:
    (all, []), left for the trainer to cut and split."""
    base = recipe.base_dir
    source = open_source(cfg.source, base, subset=cfg.subset, split=cfg.split)
    bad = BadRecords(cfg.on_bad_record)
    conversations = read_conversations(source.read(bad).records, cfg, DataReport(), bad, lambda m: None)
    if cfg.shuffle:
        conversations = shuffled(conversations, recipe.seed)
    if cfg.max_samples:
        conversations = conversations[:cfg.max_samples]
    if tokenizer is None:
        return conversations, []
    template = resolve_chat_template(recipe.model.chat_template, tokenizer, base_dir=base)
    kept = []  # the samples prepare.py keeps: not dropped as too long, at least one trained token
    for conv in conversations:
        result = tokenize_conversations([conv], template, tokenizer, train_on=cfg.train_on,
                                        max_length=recipe.model.max_seq_length, truncation=cfg.truncation)
        if result.examples:
            kept.append(conv)
    if not kept:
        raise TunebookError(f"stage {stage.name}: {cfg.source}: no sample has a token to train on\n"
                            "    fix: run `tunebook data RECIPE` to see why")
    train_idx, val_idx = split_indices(len(kept), cfg.val_size, recipe.seed)
    return [kept[i] for i in train_idx], [kept[i] for i in val_idx]


@dataclass
class StageConversations:
    train: list[list[dict]]
    val: list[list[dict]]
    train_items: list[int]  # the data item each training conversation came from
    val_items: list[int]


def stage_conversations(recipe: Recipe, stage: StageConfig, tokenizer=None) -> StageConversations:
    """One source: its conversations (see above). Several items (weights, replay): the training mix prepare.py
    builds, as conversations; this needs the tokenizer (weights count trained tokens). val: every source's
    validation conversations, in item order (replay has none)."""
    items = stage.data_items()
    if len(items) == 1:
        train, val = source_conversations(recipe, stage, items[0], tokenizer)
        return StageConversations(train, val, [0] * len(train), [0] * len(val))
    if tokenizer is None:
        raise TunebookError(f"stage {stage.name}: its data mixes {len(items)} items by trained tokens, which needs "
                            "the tokenizer\n    fix: pass the tokenizer (tunebook loads the base model's)")
    pools, val, val_items = [], [], []
    for j, item in enumerate(items):
        if isinstance(item, ReplayItem):
            earlier = recipe.stage(item.stage)
            pools.append([c for source in earlier.sources()
                          for c in source_conversations(recipe, earlier, source, tokenizer)[0]])
        else:
            train_part, val_part = source_conversations(recipe, stage, item, tokenizer)
            pools.append(train_part)
            val += val_part
            val_items += [j] * len(val_part)
    picks = prepare_stage(recipe, stage, tokenizer, log=lambda m: None).picks
    return StageConversations([pools[j][i] for j, i in picks], val, [j for j, _ in picks], val_items)
