"""`tunebook sweep`: the grid of variants, every stage they share trained once, one comparison and the variant the
objective picks within the bounds; on the tiny two-stage recipe."""
from __future__ import annotations

import json
import shlex

import pytest

from runner.errors import RecipeError, TunebookError
from runner.measure.sweep import Goal, choose, parse_goal, set_options, short_value
from runner.recipe import load_recipe
from runner.recipe.grid import expand_grid, split_values, swept
from runner.run_dir import RunDir
from train_support import two_stage_recipe


def test_grid_is_every_combination_and_keeps_commas_inside_values():
    assert expand_grid(["a.b=1,2", "c=x", "d=[1, 2],{k: 3}"]) == [
        ["a.b=1", "c=x", "d=[1, 2]"], ["a.b=1", "c=x", "d={k: 3}"],
        ["a.b=2", "c=x", "d=[1, 2]"], ["a.b=2", "c=x", "d={k: 3}"]]
    assert split_values('"x,y",z') == ['"x,y"', "z"]
    assert swept(["a.b=1,2", "c=x"]) == ["a.b"]
    with pytest.raises(RecipeError, match="empty value"):
        expand_grid(["a=1,,2"])
    with pytest.raises(RecipeError, match="KEY.PATH=VALUE"):
        expand_grid(["no-equals"])


def test_a_swept_data_section_reads_short_in_the_table_and_its_command_pastes_into_a_shell():
    vet = '{"source": "data/vet_qa.jsonl", "format": "messages", "val_size": 0.1, "system_prompt": "Be careful, say so."}'
    mixed = f'[{vet}, {{"stage": "general", "weight": 0.25}}]'
    assert short_value(vet) == "vet_qa.jsonl"
    assert short_value(mixed) == "vet_qa.jsonl + replay general 0.25"
    assert short_value("3e-5") == "3e-5"
    long = "x" * 60
    assert short_value(long).endswith("…") and len(short_value(long)) == 40
    sets = [f"stages.1.data={mixed}", "stages.1.train.learning_rate=1e-4"]
    typed = shlex.split(set_options(sets))
    assert typed == ["--set", sets[0], "--set", sets[1]]  # what the shell hands tunebook is the value as swept


def test_objective_and_bounds_are_checked_before_anything_trains(tmp_path):
    recipe = load_recipe(two_stage_recipe(tmp_path))
    goal = parse_goal("vet.eval_ppl", ["general.forgetting=0.05"], False, recipe)
    assert goal.objective == ("vet", "eval_ppl") and goal.bounds == [("general", "forgetting", 0.05)]
    for objective, bounds, message in (("vet.ppl", [], "known metric"), ("nope.eval_ppl", [], "stage of the recipe"),
                                       ("vet.forgetting", [], "before the last"),
                                       ("vet.eval_ppl", ["general.forgetting=lots"], "must be a number")):
        with pytest.raises(TunebookError, match=message):
            parse_goal(objective, bounds, False, recipe)


def test_choose_honours_the_bounds_and_the_direction():
    def variant(ppl, forgetting):
        return {"stages": {"general": {"metrics": {"forgetting": forgetting}}, "vet": {"metrics": {"eval_ppl": ppl}}}}

    variants = [variant(10.0, 0.01), variant(8.0, 0.09), variant(9.0, 0.02)]
    assert choose(variants, Goal(("vet", "eval_ppl"))) == 1
    assert choose(variants, Goal(("vet", "eval_ppl"), bounds=[("general", "forgetting", 0.05)])) == 2
    assert choose(variants, Goal(("vet", "eval_ppl"), maximize=True)) == 0
    assert choose(variants, Goal(("vet", "eval_ppl"), bounds=[("general", "forgetting", 0.001)])) is None


def test_sweep_trains_the_shared_stage_once_and_names_the_best_variant(tmp_path, capsys):
    from runner.cli.sweep import sweep

    path = two_stage_recipe(tmp_path, name="sweep")
    sweep(path, set_=["stages.1.train.learning_rate=5e-3,1e-3"], objective="vet.eval_ppl",
          max_=["general.forgetting=10"], maximize=False, export=False, out_dir=None)
    folder = RunDir.of(load_recipe(path)).sweep_dir
    result = json.loads((folder / "sweep.json").read_text())
    steps = [{name: (st["action"], st["trained_steps"]) for name, st in v["stages"].items()} for v in result["variants"]]
    assert steps == [{"general": ("train", 6), "vet": ("train", 4)}, {"general": ("reuse", 0), "vet": ("train", 4)}]
    versions = [{name: st["version"] for name, st in v["stages"].items()} for v in result["variants"]]
    assert versions[0]["general"] == versions[1]["general"] and versions[0]["vet"] != versions[1]["vet"]
    ppl = [v["stages"]["vet"]["metrics"]["eval_ppl"] for v in result["variants"]]
    assert result["chosen"] == ppl.index(min(ppl))
    assert all(v["forgetting"]["rows"] == ["base", "general", "vet"] for v in result["variants"])
    report = (folder / "report.md").read_text()
    assert f"**Chosen: variant {result['chosen'] + 1}**" in report
    assert report.count("forgetting matrix (validation perplexity)") == 2
    assert (folder / "vet-compare-perplexity.png").stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "general reused, 0 steps trained" in printed and "general trained 6 steps" in printed
    assert "export it: tunebook train" in printed
