"""metrics.jsonl: one line per training log or evaluation, appended durably, trimmed on resume so a
resumed stage has no duplicate and no missing step."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

FIELDS = ("step", "epoch", "loss", "eval_loss", "eval_ppl", "learning_rate", "grad_norm", "tokens_seen", "seconds",
          "eval_sets", "mix_tokens")
# eval_sets: {validation column: {"loss", "ppl", "tokens"}} when a stage has several validation sets (eval_loss
# and eval_ppl are then over all of them, token-weighted); mix_tokens: {item: trained tokens batched so far}
# for a stage that mixes several items


def read_metrics(path: Path) -> list[dict]:
    """All complete rows; a half-written last line (a killed run), and any line that is not a row (a damaged
    file), is ignored."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_bytes().decode("utf-8", errors="replace").split("\n"):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict) and isinstance(row.get("step", 0), int):
            rows.append({k: v for k, v in row.items() if _fits(k, v)})
    return rows


NUMBERS = ("epoch", "loss", "eval_loss", "eval_ppl", "learning_rate", "grad_norm", "tokens_seen", "seconds")


def _fits(key: str, value) -> bool:
    """A field of the kind it is written as (a hand-edited or damaged row keeps what is readable of it)."""
    if key in NUMBERS:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if key in ("eval_sets", "mix_tokens"):
        return isinstance(value, dict)
    return True


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends rows with fsync; `trim(step)` keeps only rows up to a checkpoint's step (atomically)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict) -> None:
        row = {k: _clean(row[k]) for k in FIELDS if k in row and row[k] is not None}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def trim(self, last_step: int) -> list[dict]:
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= last_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        return kept

    def last(self, key: str):
        """The latest value of a cumulative counter (tokens_seen, seconds, mix_tokens), 0 when absent."""
        for row in reversed(read_metrics(self.path)):
            if row.get(key) is not None:
                return row[key]
        return 0
