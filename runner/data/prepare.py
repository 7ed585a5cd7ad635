"""A stage's data, start to end: each source -> conversations -> chat template -> tokens + labels ->
train/validation split; then the sources and replay items mixed into the stage's training set (mix.py)
(-> batches, in pack.py).

`prepare_stage` is the one entry point. It sets `tokenizer.chat_template` to the resolved template,
so the template saved with the adapter is exactly the one the tokens were made with. Each source is
cached on disk on its own (`cache_dir`, default `$TUNEBOOK_CACHE/datasets`); a second run with the same
inputs skips tokenization and its report says `cache_hit`. A replay item draws from the training split of
the earlier stage's sources, prepared exactly as that stage prepares them: never from a validation split.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from chat.templates import template_names
from eval.labels import IGNORE_INDEX

from ..cache import cache_root
from ..errors import TunebookError
from ..recipe import DataConfig, Recipe, ReplayItem, StageConfig
from . import cache as data_cache
from .formats import BadRecord, detect_format, has_tool_turns, normalize, record_to_messages
from .mix import Mix, MixPart, build_mix, trained_tokens
from .pack import packing_efficiency
from .render import TOOL_FIX, tool_turn_problem
from .report import DataReport
from .sources import BadRecords, open_source
from .split import shuffled, split_indices
from .templates import resolve_chat_template
from .tokenize import tokenize_conversations


@dataclass
class SourceData:
    """One source's samples, split, and the report of how they were made."""

    train: list[dict]  # {"input_ids": [...], "labels": [...]} (labels -100 where not trained)
    val: list[dict]
    report: DataReport


@dataclass
class StageData:
    train: list[dict]  # the training mix; with several items each sample has "source": its item's index
    val: list[dict]    # every validation set of the stage, together
    report: DataReport  # the first source's (the only one, for a stage with one source)
    reports: list[DataReport] = field(default_factory=list)  # one per source item, in order
    val_sets: dict[str, list[dict]] = field(default_factory=dict)  # validation column -> its samples
    mix: Mix = field(default_factory=Mix)
    picks: list[tuple[int, int]] = field(default_factory=list)  # per training sample: (item, index in its pool)


def default_cache_dir() -> Path:
    return cache_root() / "datasets"


def _template_label(name: str | None) -> str:
    if name is None:
        return "the tokenizer's own"
    return name if name in template_names() else f"file {name}"


def _length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0, "p50": 0, "p95": 0, "max": 0}
    a = np.asarray(lengths)
    return {"count": len(lengths), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "max": int(a.max())}


def read_conversations(records, cfg, report: DataReport, bad: BadRecords, log,
                       tool_problem: Callable[[], str | None] | None = None) -> list[list[dict]]:
    """A source's records as conversations (format detected or as configured, system prompt added, broken
    turns counted in `report`); records that are no conversation go to `bad`, and so do conversations with
    tool turns unless `tool_problem()` (asked once, when the first one comes) says they can be trained."""
    tool_refusal: list[str | None] = []
    fmt = cfg.format
    if fmt == "auto":
        fmt, why = detect_format([r.row for r in records], cfg.fields)
        report.format_note = why
        log(f"format: auto -> {fmt} ({why})")
    report.format = fmt
    issues: Counter = Counter()
    out = []
    for record in records:
        try:
            turns = record_to_messages(record.row, fmt, cfg.fields)
        except BadRecord as exc:
            bad.add(record.where, str(exc))
            continue
        conv = normalize(turns, cfg.system_prompt, issues)
        if conv is not None and has_tool_turns(conv):
            if not tool_refusal:
                tool_refusal.append(tool_problem() if tool_problem else "this backend does not train them")
            if tool_refusal[0]:
                bad.add(record.where, f"has tool calls or tool results, and {tool_refusal[0]}", TOOL_FIX)
                continue
        if conv is not None:
            out.append(conv)
    report.conversations = len(out)
    for key in ("empty_turn", "non_alternating", "leading_assistant_dropped", "trailing_user_dropped"):
        setattr(report, key, issues[key])
    report.empty_conversations = issues["empty"]
    return out


def _no_data_error(stage: StageConfig, report: DataReport, what: str) -> TunebookError:
    counts = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in (
        ("records_read", report.records_read), ("bad_records", report.bad_records),
        ("empty", report.empty_conversations), ("not_alternating", report.non_alternating),
        ("dropped_too_long", report.dropped_too_long), ("zero_trainable", report.zero_trainable)) if v)
    return TunebookError(
        f"stage '{stage.name}': {what} ({counts or 'no records'})\n"
        "    fix: check data.source and data.format (and data.fields for other column names); if samples are "
        "cut before the first assistant reply, raise model.max_seq_length or use data.truncation: drop; "
        "data.train_on decides which turns are trained")


def prepare_stage(recipe: Recipe, stage: StageConfig, tokenizer, *, cache_dir: Path | None = None,
                  log: Callable[[str], object] = print) -> StageData:
    """The stage's training mix and validation sets, tokenized, and the reports of how they were made."""
    template = resolve_chat_template(recipe.model.chat_template, tokenizer, base_dir=recipe.base_dir)
    tokenizer.chat_template = template
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    i = recipe.stages.index(stage)
    items = stage.data_items()
    columns = stage.val_columns()
    pools, parts, reports, val_sets = [], [], [], {}
    for item in items:
        part = MixPart(item.name, getattr(item, "source", ""), item.weight)
        if isinstance(item, ReplayItem):
            part.kind = f"replay of {item.stage}"
            earlier = recipe.stage(item.stage)
            log(f"stage {stage.name}: replay of stage {item.stage}'s training split ({item.weight:g} of the mix)")
            pool = [s for source in earlier.sources()
                    for s in prepare_source(recipe, earlier, source, tokenizer, template, cache_dir, log).train]
        else:
            data = prepare_source(recipe, stage, item, tokenizer, template, cache_dir, log)
            reports.append(data.report)
            pool = data.train
            part.val, part.val_trained = len(data.val), sum(trained_tokens(s) for s in data.val)
            part.column = columns.get(item.name) if data.val else None
            if part.column:
                val_sets[part.column] = data.val
        pools.append(pool)
        parts.append(part)
    keys = [recipe.where("stages", i, "data", j, "weight") if isinstance(stage.data, list) else
            recipe.where("stages", i, "data") for j in range(len(items))]
    train, picks = build_mix(pools, parts, f"tunebook-mix:{recipe.seed}:{stage.name}", keys)
    mix = Mix(parts)
    if stage.train.packing:
        mix.packed_rows, eff = packing_efficiency([len(e["input_ids"]) for e in train], recipe.model.max_seq_length)
        mix.packing_efficiency = round(eff, 4)
    if len(items) == 1:  # the source's own report shows the packing of its (unmixed) samples
        reports[0].packed_rows, reports[0].packing_efficiency = mix.packed_rows, mix.packing_efficiency
    val = [s for samples in val_sets.values() for s in samples]
    return StageData(train, val, reports[0], reports, val_sets, mix, picks)


def prepare_source(recipe: Recipe, stage: StageConfig, cfg: DataConfig, tokenizer, template: str, cache_dir: Path,
                   log: Callable[[str], object] = print) -> SourceData:
    """Tokenized train and validation samples of one source of a stage, and the report of how they were made."""
    base = recipe.base_dir
    max_length = recipe.model.max_seq_length
    source = open_source(cfg.source, base, subset=cfg.subset, split=cfg.split)
    settings = cfg.model_dump(mode="json", exclude={"weight", "name"})  # what changes the tokens
    key = data_cache.cache_key({
        "source": source.fingerprint(), "data": settings, "seed": recipe.seed,
        "max_length": max_length, "template": template, "tokenizer": data_cache.tokenizer_fingerprint(tokenizer)})
    cached = data_cache.load(cache_dir, key)
    if cached is not None:
        train, val, saved = cached
        report = DataReport.from_dict(saved)
        report.cache_hit, report.stage = True, stage.name
        log(f"stage {stage.name}: {cfg.source}: cache hit ({cache_dir / key}), tokenization skipped")
        return SourceData(train, val, report)

    report = DataReport(stage=stage.name, source=cfg.source, template=_template_label(recipe.model.chat_template),
                        max_length=max_length, truncation=cfg.truncation, cache_key=key)
    bad = BadRecords(cfg.on_bad_record)
    log(f"stage {stage.name}: reading {cfg.source}")
    data = source.read(bad)
    report.records_read = len(data.records) + bad.count
    report.truncation_notice = data.truncation
    if data.truncation:
        log(f"note: {data.truncation}")
    if not data.records:
        report.bad_records = bad.count
        raise _no_data_error(stage, report, "the source has no usable records")
    conversations = read_conversations(data.records, cfg, report, bad, log,
                                       tool_problem=lambda: tool_turn_problem(template, tokenizer))
    report.bad_records, report.bad_reasons, report.bad_examples = bad.count, dict(bad.reasons), bad.examples
    if not conversations:
        raise _no_data_error(stage, report, "no usable conversation")
    if cfg.shuffle:
        conversations = shuffled(conversations, recipe.seed)
    if cfg.max_samples:
        conversations = conversations[:cfg.max_samples]
    report.used = len(conversations)

    log(f"stage {stage.name}: tokenizing {len(conversations):,} conversations")
    start = time.perf_counter()
    tokenized = tokenize_conversations(conversations, template, tokenizer, train_on=cfg.train_on,
                                       max_length=max_length, truncation=cfg.truncation)
    report.seconds = round(time.perf_counter() - start, 2)
    report.length = _length_stats(tokenized.lengths)
    report.truncated = tokenized.counts["truncated"]
    report.dropped_too_long = tokenized.counts["dropped_too_long"]
    report.zero_trainable = tokenized.counts["zero_trainable"]
    examples = tokenized.examples
    if not examples:
        raise _no_data_error(stage, report, "no sample has a token to train on")

    train_idx, val_idx = split_indices(len(examples), cfg.val_size, recipe.seed)
    train, val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    report.train_size, report.val_size = len(train), len(val)
    report.train_tokens = sum(len(e["input_ids"]) for e in train)
    report.trainable_tokens = sum(sum(x != IGNORE_INDEX for x in e["labels"]) for e in train)
    report.val_trainable_tokens = sum(sum(x != IGNORE_INDEX for x in e["labels"]) for e in val)
    data_cache.save(cache_dir, key, train, val, report.to_dict())
    return SourceData(train, val, report)
