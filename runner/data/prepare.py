"""A stage's data, start to end: source -> conversations -> chat template -> tokens + labels ->
train/validation split (-> batches, in data_pack).

`prepare_stage` is the one entry point. It sets `tokenizer.chat_template` to the resolved template,
so the template saved with the adapter is exactly the one the tokens were made with. Results are
cached on disk (`cache_dir`, default `$TUNEBOOK_CACHE/datasets`); a second run with the same inputs
skips tokenization and its report says `cache_hit`.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from chat.templates import template_names
from eval.labels import IGNORE_INDEX

from ..cache import cache_root
from ..errors import TunebookError
from ..recipe import Recipe, StageConfig
from . import cache as data_cache
from .formats import BadRecord, detect_format, has_tool_turns, normalize, record_to_messages
from .pack import packing_efficiency
from .render import TOOL_FIX, tool_turn_problem
from .report import DataReport
from .sources import BadRecords, open_source
from .split import shuffled, split_indices
from .templates import resolve_chat_template
from .tokenize import tokenize_conversations


@dataclass
class StageData:
    train: list[dict]  # {"input_ids": [...], "labels": [...]} (labels -100 where not trained)
    val: list[dict]
    report: DataReport


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
    """Tokenized train and validation examples for one stage, and the report of how they were made."""
    cfg = stage.data
    base = recipe.base_dir
    template = resolve_chat_template(recipe.model.chat_template, tokenizer, base_dir=base)
    tokenizer.chat_template = template
    max_length = recipe.model.max_seq_length
    source = open_source(cfg.source, base, subset=cfg.subset, split=cfg.split)

    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = data_cache.cache_key({
        "source": source.fingerprint(), "data": cfg.model_dump(mode="json"), "seed": recipe.seed,
        "max_length": max_length, "template": template, "tokenizer": data_cache.tokenizer_fingerprint(tokenizer)})
    cached = data_cache.load(cache_dir, key)
    if cached is not None:
        train, val, saved = cached
        report = DataReport.from_dict(saved)
        report.cache_hit, report.stage = True, stage.name
        log(f"stage {stage.name}: cache hit ({cache_dir / key}), tokenization skipped")
        return StageData(train, val, _with_packing(report, stage, train, max_length))

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
    return StageData(train, val, _with_packing(report, stage, train, max_length))


def _with_packing(report: DataReport, stage: StageConfig, train: list[dict], max_length: int) -> DataReport:
    """Rows and fill of the packed training set when the stage packs (not part of the cache key)."""
    report.packed_rows = report.packing_efficiency = None
    if stage.train.packing:
        report.packed_rows, eff = packing_efficiency([len(e["input_ids"]) for e in train], max_length)
        report.packing_efficiency = round(eff, 4)
    return report
