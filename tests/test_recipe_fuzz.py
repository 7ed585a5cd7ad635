"""Mutated recipes (keys dropped, renamed, retyped, random values) only ever give a RecipeError that
names a location: no other exception, no traceback, whatever the user writes."""
from __future__ import annotations

import copy
import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from runner.errors import RecipeError
from runner.recipe.plan import plan
from runner.recipe import load_recipe
from runner.recipe.source import read_yaml

from conftest import RECIPES

BASES = [read_yaml(p)[0] for p in sorted(RECIPES.glob("*.yaml"))]
for base in BASES:  # mutate whole recipes, not their parents
    base.pop("extends", None)
    base.setdefault("model", {})["base"] = "some/model"

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
KEYS = st.one_of(st.text(max_size=10), st.sampled_from(["rank", "lr", "r", "steps", "init", "extends", "name", "stages"]))


def all_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from all_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from all_paths(value, prefix + (i,))


def get(node, path):
    for key in path:
        node = node[key]
    return node


def mutate(data, draw):
    """Apply 1-4 random edits: drop a key, rename a key, replace a value, add a key."""
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in all_paths(data) if p]
        if not paths:
            return data
        path = draw(st.sampled_from(paths))
        parent, key = get(data, path[:-1]), path[-1]
        op = draw(st.sampled_from(["drop", "rename", "retype", "add"]))
        if op == "drop":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(KEYS)] = parent.pop(key)
        elif op == "retype":
            parent[key] = draw(VALUES)
        elif op == "add" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
    return data


def dump(data) -> str:
    yaml = YAML(typ="safe", pure=True)
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


WORKDIR = Path(tempfile.mkdtemp(prefix="tunebook-fuzz-"))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_recipes_only_raise_recipe_errors_with_locations(data):
    recipe_data = mutate(copy.deepcopy(data.draw(st.sampled_from(BASES))), data.draw)
    path = WORKDIR / "mutated.yaml"
    path.write_text(dump(recipe_data))
    overrides = data.draw(st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
        ["lora.r", "lora.rank", "stages.0.train.learning_rate", "stages.9.name", "model", "seed", "a.b.c"]),
        st.text(max_size=8)), max_size=2))
    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.loc is not None, exc.render()
            assert problem.loc.source in (str(path),) or problem.loc.source.startswith("--set"), exc.render()
            assert problem.message
    else:
        plan(recipe)  # a valid recipe can always be planned
