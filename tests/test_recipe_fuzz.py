"""Mutated recipes (keys dropped, renamed, retyped, random values) only ever give a RecipeError that
names a location: no other exception, no traceback, whatever the user writes."""
from __future__ import annotations

import copy
import json
import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
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


# --------------------------------------------------------------------------------- hostile YAML documents
# Whole documents as text, not mutated data: anchors and aliases (defined, undefined, nested into bombs),
# tags, flow and block nesting, sizes, broken syntax and bytes. Every outcome is a recipe or a RecipeError
# whose problems all carry a location; nothing else, and no document may expand before it is refused.

ANCHORS = st.sampled_from(["a", "b", "c"])
TAGS = st.sampled_from(["!foo", "!!python/object:os.system", "!!str", "!!binary", "!!set", "!!map", "!<tag:x>"])
PLAIN = st.sampled_from(["x", "r", "1e-4", "16", "true", "null", "~", "yes", "2024-01-01", "-", "a b", "ü"])
SCALARS = st.one_of(PLAIN, st.integers(-10**6, 10**6).map(str), st.text(max_size=8).map(json.dumps))


def _flow_map(items: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in items.items()) + "}"


FLOW = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
    st.dictionaries(st.sampled_from(["r", "name", "base", "k", "<<"]), inner, max_size=3).map(_flow_map),
    st.tuples(ANCHORS, inner).map(lambda t: f"&{t[0]} {t[1]}"),
    ANCHORS.map(lambda a: f"*{a}"),
    st.tuples(TAGS, inner).map(lambda t: f"{t[0]} {t[1]}"),
), max_leaves=30)


@st.composite
def alias_bomb(draw) -> str:
    width, depth = draw(st.integers(2, 9)), draw(st.integers(3, 12))
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


@st.composite
def deep(draw) -> str:
    n = draw(st.integers(10, 20_000))
    if draw(st.booleans()):
        return "a: " + "[" * n + "]" * n + "\n"
    n = min(n, 200)
    return "".join("  " * i + f"k{i}:\n" for i in range(n)) + "  " * n + "v: 1\n"


ONE_IN_10 = st.sampled_from([False] * 9 + [True])


@st.composite
def yaml_document(draw) -> bytes:
    kind = draw(st.sampled_from(["recipe", "lines", "bomb", "deep", "value", "text"]))
    if kind == "recipe":  # a real recipe with hostile values put in
        text = dump(draw(st.sampled_from(BASES)))
        lines = text.splitlines()
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(lines)))
            lines.insert(at, f"{draw(st.sampled_from(['lora', 'seed', 'extra', 'stages']))}: {draw(FLOW)}")
        text = "\n".join(lines) + "\n"
    elif kind == "lines":
        text = "".join(f"{k}: {v}\n" for k, v in draw(st.dictionaries(st.sampled_from(
            ["name", "model", "lora", "stages", "x", "a", "b"]), FLOW, min_size=1, max_size=6)).items())
    elif kind == "bomb":
        text = draw(alias_bomb())
    elif kind == "deep":
        text = draw(deep())
    elif kind == "value":
        text = draw(FLOW) + "\n"
    else:
        text = draw(st.text(max_size=200))
    data = text.encode("utf-8", "surrogatepass")
    if draw(ONE_IN_10):  # cut anywhere
        data = data[: draw(st.integers(0, len(data)))]
    if draw(ONE_IN_10):
        data = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\x00", b"\xc3\x28"])) + data
    if draw(ONE_IN_10) and draw(st.booleans()):
        data = data + b"\n#" + b"x" * 300_000  # over the size limit
    return data


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(yaml_document())
def test_hostile_yaml_documents_only_raise_located_recipe_errors(document):
    path = WORKDIR / "hostile.yaml"
    path.write_bytes(document)
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.loc is not None and problem.loc.source == str(path), exc.render()
            assert problem.message and "Commented" not in problem.message, exc.render()
        event(" ".join(exc.problems[0].message.split()[:4]))
    else:
        event("a valid recipe")


@pytest.mark.parametrize("document", [b"name: {<<: {r: x}}\n", b"name: {<<: {r: [], name: []}, r: []}\n"])
def test_merge_keys_are_located_at_their_mapping(tmp_path, document):
    """Keys merged in by `<<:` have no place of their own in the file: errors point at the mapping instead."""
    path = tmp_path / "merge.yaml"
    path.write_bytes(document)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:1:" in str(info.value)
