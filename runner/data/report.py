"""What happened to a stage's data, in numbers: read, kept, skipped and why, lengths, split, tokens.

Nothing is dropped silently: every record that does not become a training sample is counted under
one reason here, and `tunebook data` prints it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text


@dataclass
class DataReport:
    stage: str = ""
    source: str = ""
    format: str = ""
    format_note: str | None = None      # why `format: auto` chose what it chose
    template: str = ""
    records_read: int = 0
    truncation_notice: str | None = None  # a file that ended mid-record
    bad_records: int = 0
    bad_reasons: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)
    conversations: int = 0               # records that became valid conversations
    empty_conversations: int = 0
    empty_turn: int = 0                  # a turn with no text: the conversation is skipped
    non_alternating: int = 0
    leading_assistant_dropped: int = 0   # repaired, kept
    trailing_user_dropped: int = 0       # repaired, kept
    used: int = 0                        # after shuffling and max_samples
    length: dict[str, float] = field(default_factory=dict)  # count, p50, p95, max (tokens, before truncation)
    max_length: int = 0
    truncation: str = "truncate"
    truncated: int = 0
    dropped_too_long: int = 0
    zero_trainable: int = 0
    train_size: int = 0
    val_size: int = 0
    train_tokens: int = 0
    trainable_tokens: int = 0            # labelled tokens in the training split
    val_trainable_tokens: int = 0
    packed_rows: int | None = None
    packing_efficiency: float | None = None
    cache_hit: bool = False
    cache_key: str | None = None
    seconds: float = 0.0                 # rendering + tokenization (0 on a cache hit)

    @property
    def pct_truncated(self) -> float:
        n = self.length.get("count", 0)
        return 100 * self.truncated / n if n else 0.0

    @property
    def pct_dropped(self) -> float:
        n = self.length.get("count", 0)
        return 100 * self.dropped_too_long / n if n else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "pct_truncated": self.pct_truncated, "pct_dropped": self.pct_dropped}

    @classmethod
    def from_dict(cls, data: dict) -> DataReport:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _n(x: int) -> str:
    return f"{x:,}"


def report_rows(r: DataReport) -> list[tuple[str, str]]:
    """(label, value) lines, in the order the data flows."""
    skipped = [f"{_n(n)} {what}" for n, what in (
        (r.bad_records, "bad records"), (r.empty_conversations, "empty"), (r.empty_turn, "with an empty turn"),
        (r.non_alternating, "not alternating user/assistant")) if n]
    repaired = [f"{_n(n)} {what}" for n, what in (
        (r.leading_assistant_dropped, "leading assistant turn dropped"),
        (r.trailing_user_dropped, "trailing user turn dropped")) if n]
    L = r.length
    rows = [
        ("source", r.source),
        ("format", r.format + (f" (auto: {r.format_note})" if r.format_note else "")),
        ("chat template", r.template),
        ("records read", _n(r.records_read) + (" (file cut off: see note)" if r.truncation_notice else "")),
        ("conversations", _n(r.conversations) + (f"; skipped {', '.join(skipped)}" if skipped else "")),
    ]
    if repaired:
        rows.append(("repaired, kept", ", ".join(repaired)))
    rows += [
        ("used", _n(r.used) + (" (max_samples)" if r.used < r.conversations else "")),
        ("tokens / sample", f"p50 {L.get('p50', 0):,.0f}, p95 {L.get('p95', 0):,.0f}, max {L.get('max', 0):,.0f}"
                            f" (limit {r.max_length:,})"),
        ("over the limit", f"{_n(r.truncated)} truncated ({r.pct_truncated:.1f}%), "
                           f"{_n(r.dropped_too_long)} dropped ({r.pct_dropped:.1f}%) [truncation: {r.truncation}]"),
        ("no trainable token", f"{_n(r.zero_trainable)} samples left out"),
        ("split", f"{_n(r.train_size)} train, {_n(r.val_size)} validation"),
        ("train tokens", f"{_n(r.train_tokens)} ({_n(r.trainable_tokens)} trained on, "
                         f"{100 * r.trainable_tokens / max(1, r.train_tokens):.0f}%)"),
    ]
    if r.packed_rows is not None:
        rows.append(("packing", f"{_n(r.packed_rows)} rows of {r.max_length:,} tokens, "
                                f"efficiency {100 * (r.packing_efficiency or 0):.1f}%"))
    rows.append(("tokenized", "cache hit (tokenization skipped)" if r.cache_hit else f"in {r.seconds:.1f} s"))
    return rows


def render_report(r: DataReport, title: str | None = None) -> Group:
    """A rich table of the report plus its notes (truncated file, bad record examples)."""
    table = Table(title=title or f"stage {r.stage}", title_justify="left", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in report_rows(r):
        table.add_row(label, value)
    notes = []
    if r.truncation_notice:
        notes.append(Text(f"note: {r.truncation_notice}", style="yellow"))
    for reason, n in r.bad_reasons.items():
        notes.append(Text(f"skipped {n:,} bad record(s): {reason}", style="yellow"))
    for example in r.bad_examples:
        notes.append(Text(f"  e.g. {example}", style="dim"))
    return Group(table, *notes)


def mix_rows(mix) -> list[tuple[str, list[str]]]:
    """A stage's training mix (runner/data/mix.py's Mix) as (label, one value per item and the whole) rows."""
    shares = mix.shares()
    parts = mix.parts
    val = sum(p.val for p in parts)
    return [
        ("from", [p.kind for p in parts] + [""]),
        ("weight (share of trained tokens)", [f"{p.weight:g}" for p in parts] + ["1"]),
        ("samples (of its pool)", [f"{_n(p.samples)} of {_n(p.pool)}" for p in parts] + [_n(mix.samples)]),
        ("tokens", [_n(p.tokens) for p in parts] + [_n(mix.tokens)]),
        ("trained tokens", [f"{_n(p.trained)} ({100 * shares[p.name][1]:.1f}%)" for p in parts] + [_n(mix.trained)]),
        ("share of samples", [f"{100 * shares[p.name][0]:.1f}%" for p in parts] + ["100%"]),
        ("pool used", [f"{p.repeats:.2f}x" for p in parts] + [""]),
        ("validation samples", [f"{_n(p.val)} ({p.column})" if p.column else "–" for p in parts] + [_n(val)]),
    ]


def render_mix(stage: str, mix) -> Group:
    """The mix of a stage's data list: what each item gives after truncation, and the packed rows of the whole.
    Weights are shares of trained tokens; the share of samples is shown beside them."""
    table = Table(title=f"stage {stage}: training mix", title_justify="left")
    table.add_column("", style="bold")
    for p in mix.parts:
        table.add_column(p.name, justify="right", overflow="fold")
    table.add_column("all", justify="right")
    for label, values in mix_rows(mix):
        table.add_row(label, *values)
    notes = []
    if mix.packed_rows is not None:
        notes.append(Text(f"packed: {_n(mix.packed_rows)} rows of the items together, efficiency "
                          f"{100 * (mix.packing_efficiency or 0):.1f}% (no sample attends to another)", style="dim"))
    return Group(table, *notes)
