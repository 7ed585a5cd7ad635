"""`tunebook sweep`'s grid: `--set KEY=V1,V2,...` options become variants, each a list of plain `--set`
overrides. Every combination is a variant, the first key varying slowest; a key with one value is set in all."""
from __future__ import annotations

import itertools
import math

from ..errors import Loc, Problem, RecipeError
from .source import parse_set

OPEN, CLOSE, QUOTES = "[{", "]}", "'\""
MAX_VARIANTS = 256  # beyond this a grid is a typo, not a plan: each variant is a training run


def split_values(raw: str) -> list[str]:
    """`1e-4,3e-4` -> ['1e-4', '3e-4']; commas inside brackets, braces or quotes stay (`[a, b]`, `"x,y"`)."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(raw):
        if quote:
            quote = None if ch == quote else quote
        elif ch in QUOTES:
            quote = ch
        elif ch in OPEN:
            depth += 1
        elif ch in CLOSE:
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    return [v.strip() for v in values]


def expand_grid(sets: list[str]) -> list[list[str]]:
    """The variants of a sweep: [['stages.1.train.learning_rate=1e-4'], ['stages.1.train.learning_rate=3e-4']]."""
    axes, seen = [], set()
    for expr in sets:
        key, equals, raw = expr.partition("=")
        if equals and key.strip() in seen:  # the later one would win in every variant: variants that differ in name only
            raise RecipeError([Problem(Loc(f"--set {expr}"), key.strip(), "this key is set twice in the sweep",
                                       f"give all its values in one option, e.g. --set {key.strip()}=V1,V2")])
        seen.add(key.strip())
        values = split_values(raw)
        if equals and any(not v for v in values):
            raise RecipeError([Problem(Loc(f"--set {expr}"), key.strip(), "an empty value in the list of values",
                                       "separate values with single commas, e.g. --set lr=1e-4,3e-4")])
        axes.append([f"{key.strip()}={v}" for v in values])
        for one in axes[-1] if equals else [expr]:
            parse_set(one)  # the form KEY.PATH=VALUE and a readable value, with their own clear errors
    variants = math.prod(len(axis) for axis in axes)
    if variants > MAX_VARIANTS:
        raise RecipeError([Problem(Loc("--set"), "--set", f"{variants:,} variants: each trains (and is measured) in turn",
                                   f"sweep at most {MAX_VARIANTS} at once: fewer values per key, or fewer keys")])
    return [list(combo) for combo in itertools.product(*axes)]


def swept(sets: list[str]) -> list[str]:
    """The keys that take more than one value (what tells the variants apart)."""
    return [expr.partition("=")[0].strip() for expr in sets if len(split_values(expr.partition("=")[2])) > 1]
