"""Seeded choices over a stage's samples: which ones are used (shuffle) and which are held out.

Seeds are strings hashed by `random.Random` itself (not Python's per-process `hash`), so every run
and every rank of a multi-process launch picks the same rows.
"""
from __future__ import annotations

import random

from ..errors import TunebookError


def shuffled(items: list, seed: int) -> list:
    out = list(items)
    random.Random(f"tunebook-shuffle:{seed}").shuffle(out)
    return out


def split_indices(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices of n samples. val_size: a fraction in (0, 1) (at least one row), a whole
    count >= 1, or 0 for no validation set."""
    if val_size == 0 or n == 0:
        return list(range(n)), []
    n_val = int(val_size) if val_size >= 1 else max(1, round(n * val_size))
    if n_val >= n:
        raise TunebookError(f"val_size {val_size:g} leaves no training data ({n:,} samples in all)\n"
                            "    fix: use a smaller data.val_size (a fraction like 0.05, or a count below the "
                            "number of samples)")
    val = sorted(random.Random(f"tunebook-split:{seed}").sample(range(n), n_val))
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], val
