"""Several sources in one stage: the training mix, built once from each item's training split and its weight.

A weight is a share of the stage's TRAINED tokens (tokens that carry a label, usually the assistant's), not of
samples: "10% general data" means one trained token in ten comes from it, however long its samples are.
The first item sets the size of the mix: all of its training split, once. Every other item gets
weight x (first item's trained tokens / first item's weight) trained tokens: a seeded random part of its pool
when the pool is larger, whole passes over the pool and then a random part when it is smaller. An item that
would be repeated more than MAX_REPEATS times is an error: it is too small for its share. A replay item's pool
is the earlier stage's training split (runner/data/prepare.py never hands it a validation sample).

The draw walks the pool in a seeded random order and takes every sample that still fits the item's tokens,
then the shortest one left if that comes closer: a share is met to within half of the pool's shortest sample. Every sample in the mix
carries "source": the item it came from, so a trainer can count what it actually batched.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from eval.labels import IGNORE_INDEX

from ..errors import TunebookError

MAX_REPEATS = 4.0  # an item drawn more often than this many times over is too small for its share


@dataclass
class MixPart:
    """One item of a stage's data list, as mixed: what it could give, what it gave."""

    name: str
    kind: str                 # the source it reads, or "replay of <stage>"
    weight: float
    pool: int = 0             # samples it draws from (its training split, or the earlier stage's)
    pool_trained: int = 0     # trained tokens in that pool
    samples: int = 0          # in the mix (a repeated sample counts each time)
    tokens: int = 0
    trained: int = 0          # trained tokens in the mix
    val: int = 0              # its validation samples (sources only; replay has none)
    val_trained: int = 0
    column: str | None = None  # its validation column (forgetting matrix, eval during training)

    @property
    def repeats(self) -> float:
        """How many times over its pool this item is used (1.0: every sample once)."""
        return self.trained / self.pool_trained if self.pool_trained else 0.0


@dataclass
class Mix:
    """A stage's training mix, in numbers: per item, and packed as a whole."""

    parts: list[MixPart] = field(default_factory=list)
    packed_rows: int | None = None
    packing_efficiency: float | None = None

    @property
    def samples(self) -> int:
        return sum(p.samples for p in self.parts)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.parts)

    @property
    def trained(self) -> int:
        return sum(p.trained for p in self.parts)

    def shares(self) -> dict[str, tuple[float, float]]:
        """{item: (share of samples, share of trained tokens)}."""
        return {p.name: (p.samples / max(1, self.samples), p.trained / max(1, self.trained)) for p in self.parts}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Mix":
        return cls([MixPart(**p) for p in data.get("parts", [])], data.get("packed_rows"),
                   data.get("packing_efficiency"))


def trained_tokens(sample: dict) -> int:
    return sum(label != IGNORE_INDEX for label in sample["labels"])


def draw(trained: list[int], need: float, seed: str) -> list[int]:
    """Indices into a pool (of these trained-token counts) adding up closest to `need` trained tokens: whole
    passes over the pool, then, in a seeded random order (no sample twice within a pass), every sample that
    still fits, and the shortest one left if it brings the total closer. The random order decides; only the
    last few picks, which close the gap, lean to samples short enough to fit it."""
    total = sum(trained)
    passes = int(need // total) if total else 0
    rest = need - passes * total
    chosen = list(range(len(trained))) * passes
    order = list(range(len(trained)))
    random.Random(seed).shuffle(order)
    got, left = 0, []
    for i in order:  # every sample that still fits, in the random order
        if got + trained[i] <= rest:
            got += trained[i]
            chosen.append(i)
        else:
            left.append(i)
    if left:  # the gap is now smaller than any sample left: the shortest one closes it if that comes closer
        shortest = min(left, key=lambda i: trained[i])
        if got + trained[shortest] / 2 <= rest:
            chosen.append(shortest)
    return chosen


def build_mix(pools: list[list[dict]], parts: list[MixPart], seed: str,
              keys: list[str]) -> tuple[list[dict], list[tuple[int, int]]]:
    """(the stage's training samples, where each came from: (item, index in its pool)). The first pool whole,
    every other one drawn to its weight; each sample tagged with "source" (its item's index). Fills in the
    parts' numbers. keys: each item's weight key, with the place it was written, for errors."""
    counts = [[trained_tokens(s) for s in pool] for pool in pools]
    for part, pool, trained in zip(parts, pools, counts):
        part.pool, part.pool_trained = len(pool), sum(trained)
    if len(pools) == 1:
        chosen = [list(range(len(pools[0])))]
    else:
        unit = parts[0].pool_trained / parts[0].weight  # the stage's trained tokens
        chosen = [list(range(len(pools[0])))]
        for j in range(1, len(pools)):
            need = parts[j].weight * unit
            if not parts[j].pool_trained or need / parts[j].pool_trained > MAX_REPEATS:
                raise TunebookError(
                    f"{keys[j]}: item '{parts[j].name}' is too small for its share: {parts[j].weight:g} of the "
                    f"stage's {unit:,.0f} trained tokens is {need:,.0f}, and its {parts[j].pool:,} samples hold "
                    f"{parts[j].pool_trained:,} (it would be repeated "
                    f"{need / max(1, parts[j].pool_trained):.1f} times, more than {MAX_REPEATS:g})\n"
                    "    fix: lower its weight, give it more data, or cap the first item with max_samples")
            chosen.append(draw(counts[j], need, f"{seed}:{parts[j].name}"))
    for part, pool, trained, picks in zip(parts, pools, counts, chosen):
        part.samples = len(picks)
        part.tokens = sum(len(pool[i]["input_ids"]) for i in picks)
        part.trained = sum(trained[i] for i in picks)
    if len(pools) == 1:  # one source: its samples as they are, untagged (source 0)
        return list(pools[0]), [(0, i) for i in chosen[0]]
    order = [(j, i) for j, picks in enumerate(chosen) for i in picks]
    random.Random(f"{seed}:order").shuffle(order)
    return [{**pools[j][i], "source": j} for j, i in order], order
