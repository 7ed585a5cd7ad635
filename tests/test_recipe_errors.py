"""Every kind of recipe mistake gives one clear error naming the file, the line and the fix."""
from __future__ import annotations

import pytest

from runner.errors import RecipeError
from runner.recipe import load_recipe

from conftest import RECIPES

MINIMAL = """\
name: tiny
model:
  base: some/model
stages:
  - name: one
    data:
      source: data.jsonl
    train:
      max_steps: 10
      eval_steps: 5
"""


def error_of(path, overrides=()) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value


def only_problem(exc: RecipeError):
    assert len(exc.problems) == 1, exc.render()
    return exc.problems[0]


def test_minimal_recipe_is_valid_and_filled_with_defaults(write):
    recipe = load_recipe(write("r.yaml", MINIMAL))
    assert recipe.stages[0].init == "fresh"
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.stages[0].data.train_on == "assistant"


def test_unknown_key_names_file_line_and_closest_key(write):
    path = write("r.yaml", MINIMAL.replace("  base: some/model\n", "  base: some/model\n  load_in_4bits: true\n"))
    p = only_problem(error_of(path))
    assert (p.loc.source, p.loc.line, p.loc.column) == (str(path), 4, 3)
    assert "unknown key 'load_in_4bits'" in p.message
    assert "did you mean 'load_in_4bit'?" in p.fix


def test_acceptance_rank_in_a_recipe_that_extends_a_seed_recipe(write, tmp_path):
    parent = RECIPES / "finetome-llama-3.2-1b.yaml"
    path = write("mine.yaml", f"extends: {parent}\nname: mine\nlora: {{rank: 16}}\n")
    p = only_problem(error_of(path))
    assert p.loc.source == str(path) and p.loc.line == 3
    assert "did you mean 'r'?" in p.fix
    rendered = error_of(path).render()
    assert f"{path}:3:" in rendered and "did you mean 'r'?" in rendered


def test_enum_lists_allowed_values(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL + "backend: axolotel\n")))
    assert p.loc.line == 11
    assert "'axolotel' is not an allowed value" in p.message
    assert "did you mean 'axolotl'?" in p.fix and "hf, unsloth, axolotl" in p.fix


def test_number_out_of_range_gives_the_valid_range(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("max_steps: 10", "max_steps: 10\n      learning_rate: -1"))))
    assert p.path == "stages.0.train.learning_rate" and p.loc.line == 10
    assert "out of range" in p.message and "> 0" in p.fix


def test_non_positive_batch_size(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("max_steps: 10", "max_steps: 10\n      micro_batch_size: 0"))))
    assert p.path == "stages.0.train.micro_batch_size" and "> 0" in p.fix


def test_wrong_type(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("max_steps: 10", "max_steps: lots"))))
    assert p.loc.line == 9 and "whole number" in p.message


def test_missing_required_key_points_at_its_parent(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("      source: data.jsonl\n", "      format: messages\n"))))
    assert p.path == "stages.0.data.source" and "missing" in p.message
    assert p.loc.line == 6 and "add `source:`" in p.fix


def test_an_empty_source_is_named_and_a_file_name_with_spaces_gets_a_usable_name(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("source: data.jsonl", 'source: ""'))))
    assert p.path == "stages.0.data.source" and p.loc.line == 7
    assert "expected a data source, got ''" in p.message and "package:<module>" in p.fix
    recipe = load_recipe(write("r.yaml", MINIMAL.replace("source: data.jsonl", 'source: "my vet data.jsonl"')))
    assert [item.name for item in recipe.stages[0].data_items()] == ["my-vet-data"]
    recipe = load_recipe(write("r.yaml", MINIMAL.replace("source: data.jsonl", "source: 'package:'")))
    assert [item.name for item in recipe.stages[0].data_items()] == ["data"]


def test_neither_max_steps_nor_num_epochs(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("      max_steps: 10\n      eval_steps: 5\n", "      learning_rate: 1e-4\n"))))
    assert "neither max_steps nor num_epochs" in p.message and "exactly one" in p.fix
    assert p.loc.line == 8


def test_both_max_steps_and_num_epochs(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("max_steps: 10", "max_steps: 10\n      num_epochs: 1"))))
    assert "both max_steps and num_epochs" in p.message and p.loc.line == 9


def test_eval_steps_larger_than_max_steps_evaluates_at_the_end(write):
    """A run shortened with --set max_steps keeps one evaluation, at its last step, without a second override."""
    recipe = load_recipe(write("r.yaml", MINIMAL.replace("eval_steps: 5", "eval_steps: 50")))
    assert recipe.stages[0].train.eval_steps == 10


def test_first_stage_cannot_continue(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("  - name: one\n", "  - name: one\n    init: continue\n"))))
    assert p.path == "stages.0.init" and p.loc.line == 6 and "init: fresh" in p.fix


def test_first_stage_cannot_merge(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("  - name: one\n", "  - name: one\n    init: merge\n"))))
    assert p.path == "stages.0.init"


def test_duplicate_stage_names(write):
    second = "  - name: one\n    data: {source: b.jsonl}\n    train: {max_steps: 5}\n"
    p = only_problem(error_of(write("r.yaml", MINIMAL + second)))
    assert p.path == "stages.1.name" and p.loc.line == 11 and "used twice" in p.message


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "-3"])
def test_val_size_must_be_fraction_or_count(write, bad):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("      source: data.jsonl\n", f"      source: data.jsonl\n      val_size: {bad}\n"))))
    assert p.path == "stages.0.data.val_size" and p.loc.line == 8 and "fraction in (0, 1)" in p.message


@pytest.mark.parametrize("good", ["0.1", "64", "0"])
def test_val_size_fraction_count_or_none(write, good):
    text = MINIMAL.replace("      source: data.jsonl\n", f"      source: data.jsonl\n      val_size: {good}\n")
    if good == "0":
        text = text.replace("      eval_steps: 5\n", "")
    assert load_recipe(write("r.yaml", text)).stages[0].data.val_size == float(good)


def test_eval_steps_without_validation_set(write):
    text = MINIMAL.replace("      source: data.jsonl\n", "      source: data.jsonl\n      val_size: 0\n")
    p = only_problem(error_of(write("r.yaml", text)))
    assert "no validation set" in p.message


def test_4bit_and_8bit_together(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL.replace("  base: some/model\n", "  base: some/model\n  load_in_4bit: true\n  load_in_8bit: true\n"))))
    assert p.path == "model.load_in_8bit" and p.loc.line == 5 and "choose one" in p.fix


def test_several_problems_are_all_reported_in_line_order(write):
    text = MINIMAL.replace("max_steps: 10", "max_steps: 10\n      lr: 1").replace("name: tiny", "name: tiny\nbackend: x")
    exc = error_of(write("r.yaml", text))
    assert [p.loc.line for p in exc.problems] == sorted(p.loc.line for p in exc.problems)
    assert len(exc.problems) == 2


def test_yaml_syntax_error_has_a_position(write):
    p = only_problem(error_of(write("r.yaml", "name: x\nmodel:\n  base: [unclosed\n")))
    assert p.loc.line is not None and "YAML error" in p.message


def test_duplicate_key_is_an_error(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL + "seed: 1\nseed: 2\n")))
    assert "duplicate" in p.message and p.loc.line is not None


def test_empty_and_non_mapping_files(write):
    assert "empty" in only_problem(error_of(write("a.yaml", ""))).message
    assert "mapping" in only_problem(error_of(write("b.yaml", "- a\n- b\n"))).message


def test_missing_file(tmp_path):
    p = only_problem(error_of(tmp_path / "nope.yaml"))
    assert "not found" in p.message


def test_extends_merges_mappings_and_replaces_lists(write):
    write("base.yaml", MINIMAL + "lora:\n  r: 8\n  alpha: 4\n")
    child = write("child.yaml", "extends: base.yaml\nname: child\nlora:\n  r: 32\n")
    recipe = load_recipe(child)
    assert (recipe.name, recipe.lora.r, recipe.lora.alpha) == ("child", 32, 4)
    assert recipe.stages[0].name == "one"


def test_extends_chain_and_error_in_the_parent_names_the_parent(write):
    write("grand.yaml", "lora:\n  rank: 8\n")
    write("parent.yaml", "extends: grand.yaml\n" + MINIMAL)
    child = write("child.yaml", "extends: parent.yaml\nseed: 1\n")
    p = only_problem(error_of(child))
    assert p.loc.source.endswith("grand.yaml") and p.loc.line == 2 and "did you mean 'r'?" in p.fix


def test_extends_cycle_is_an_error(write):
    write("a.yaml", "extends: b.yaml\n")
    b = write("b.yaml", "extends: a.yaml\n")
    p = only_problem(error_of(b))
    assert "cycle" in p.message


def test_extends_missing_file(write):
    p = only_problem(error_of(write("a.yaml", "extends: nowhere.yaml\n" + MINIMAL)))
    assert p.loc.line == 1 and "missing file" in p.message


def test_stage_defaults_apply_to_every_stage_and_stage_keys_win(write):
    text = MINIMAL + "  - name: two\n    data: {source: b.jsonl}\n    train: {max_steps: 4, learning_rate: 1e-5}\ntrain:\n  learning_rate: 3e-4\n  warmup_steps: 2\n"
    recipe = load_recipe(write("r.yaml", text))
    assert recipe.stages[0].train.learning_rate == 3e-4 and recipe.stages[1].train.learning_rate == 1e-5
    assert recipe.stages[1].train.warmup_steps == 2 and recipe.stages[1].init == "continue"


def test_error_in_stage_defaults_points_at_the_defaults(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL + "train:\n  lr: 1\n")))
    assert p.path == "train.lr" and p.loc.line == 12 and "did you mean 'learning_rate'?" in p.fix


def test_set_overrides_are_typed_by_the_schema(write):
    path = write("r.yaml", MINIMAL)
    recipe = load_recipe(path, ["stages.0.train.learning_rate=1e-4", "lora.r=64", "lora.target_modules=[q_proj, v_proj]"])
    assert recipe.stages[0].train.learning_rate == 1e-4 and recipe.lora.r == 64
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]


def test_set_unknown_key_fails_like_an_unknown_key(write):
    p = only_problem(error_of(write("r.yaml", MINIMAL), ["lora.rank=16"]))
    assert p.loc.source == "--set lora.rank=16" and "did you mean 'r'?" in p.fix


def test_set_wrong_type_and_bad_index_and_bad_form(write):
    path = write("r.yaml", MINIMAL)
    assert "whole number" in only_problem(error_of(path, ["lora.r=big"])).message
    assert "no item 3" in only_problem(error_of(path, ["stages.3.train.max_steps=1"])).message
    assert "KEY.PATH=VALUE" in only_problem(error_of(path, ["lora.r"])).message
