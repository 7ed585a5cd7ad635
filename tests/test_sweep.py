"""`tunebook sweep`: the grid of variants, every stage they share trained once, one comparison and the variant the
objective picks within the bounds; on the tiny two-stage recipe."""
from __future__ import annotations

import json
import math
import shlex

import pytest

from runner.errors import RecipeError, TunebookError
from runner.measure.sweep import (Goal, choose, parse_goal, set_options, short_value, tied_with, within,
                                  write_sweep_report)
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
    with pytest.raises(RecipeError, match="this key is set twice in the sweep"):
        expand_grid(["lora.r=4,8", "lora.r=16"])
    with pytest.raises(RecipeError, match="1,000 variants"):
        expand_grid([f"k{i}=" + ",".join(map(str, range(10))) for i in range(3)])


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


def test_gate_metrics_need_an_evaluation_set_and_an_export(tmp_path):
    path = two_stage_recipe(tmp_path)
    with pytest.raises(TunebookError, match="needs an evaluation set and an export"):
        parse_goal("gate.chat.warning_rate", [], True, load_recipe(path))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"id": "q", "question": "Grapes?", "reference": "Call a vet.",
                                                     "refer": True, "warn": False}) + "\n")
    with path.open("a") as f:
        f.write("export: {quantization: q8_0}\neval: {data: eval.jsonl}\n")
    recipe = load_recipe(path)
    goal = parse_goal("gate.chat.warning_rate", ["gate.greedy.forbidden=0"], True, recipe, ["gate.greedy.stop_rate=0.9"])
    assert goal.objective == ("gate", "chat.warning_rate") and goal.needs_gate
    assert goal.limits() == [("gate", "greedy.forbidden", "≤", 0.0), ("gate", "greedy.stop_rate", "≥", 0.9)]
    assert not parse_goal("vet.eval_ppl", [], False, recipe).needs_gate
    for objective, message in (("gate.chat.warnings", "not a number of the evaluation gate"),
                               ("gate.sampled.stop_rate", "MODE greedy or chat")):
        with pytest.raises(TunebookError, match=message):
            parse_goal(objective, [], True, recipe)
    for floor, message in (("gate.greedy.stop_rate=90", "a rate is a fraction from 0 to 1"),
                           ("gate.greedy.stop_rate=nan", "the limit must be a number")):
        with pytest.raises(TunebookError, match=message):
            parse_goal("gate.chat.warning_rate", [], True, recipe, [floor])


def test_floors_and_gate_numbers_decide_the_choice():
    def variant(warning, stop, forbidden):
        return {"stages": {}, "gate": {"chat.warning_rate": warning, "greedy.stop_rate": stop,
                                       "greedy.forbidden": forbidden}}

    variants = [variant(0.95, 0.85, 0), variant(0.90, 0.92, 0), variant(0.97, 0.95, 2), {"stages": {}}]
    goal = Goal(("gate", "chat.warning_rate"), maximize=True)
    assert choose(variants, goal) == 2
    goal.bounds = [("gate", "greedy.forbidden", 0.0)]
    assert choose(variants, goal) == 0
    goal.floors = [("gate", "greedy.stop_rate", 0.9)]
    assert choose(variants, goal) == 1 and not within(variants[3], goal)  # a variant never measured meets no bound
    goal.floors = [("gate", "greedy.stop_rate", 0.99)]
    assert choose(variants, goal) is None
    # a rate over no expected answers is NaN: not a measurement, never chosen, whichever way and order
    nan = [variant(math.nan, 0.95, 0), variant(0.5, 0.95, 0), variant(0.9, 0.95, 0)]
    for maximize, best in ((True, 2), (False, 1)):
        assert choose(nan, Goal(("gate", "chat.warning_rate"), maximize=maximize)) == best
        assert choose(nan[::-1], Goal(("gate", "chat.warning_rate"), maximize=maximize)) == 2 - best
    assert choose(nan[:1], Goal(("gate", "chat.warning_rate"), maximize=True)) is None


def test_every_variant_must_have_what_the_objective_names(tmp_path):
    from runner.cli.sweep import sweep

    path = two_stage_recipe(tmp_path, name="renamed")
    with pytest.raises(TunebookError, match=r"variant 2 \(stages.1.name=other\): --objective vet.eval_ppl"):
        sweep(path, set_=["stages.1.name=vet,other"], objective="vet.eval_ppl", max_=None, maximize=False,
              export=False, out_dir=None)
    assert not (tmp_path / "runs").exists()  # refused before anything trained


def test_a_tie_on_the_objective_is_said(tmp_path):
    def variant(temperature, warning, forbidden):
        return {"sets": [f"chat.temperature={temperature}"], "stages": {}, "forgetting": None,
                "gate": {"chat.warning_rate": warning, "chat.forbidden": forbidden}}

    variants = [variant(0.2, 0.8, 0), variant(0.4, 0.9, 0), variant(0.7, 0.9, 0), variant(1.0, 0.9, 3)]
    goal = Goal(("gate", "chat.warning_rate"), maximize=True, bounds=[("gate", "chat.forbidden", 0.0)])
    assert choose(variants, goal) == 1 and tied_with(variants, goal, 1) == [2]  # variant 4 is out of bounds
    report, chosen = write_sweep_report(tmp_path / "r.yaml", variants, ["chat.temperature"], goal, tmp_path)
    assert chosen == 1 and "Variant 3 ties with it on gate.chat.warning_rate" in report.read_text()
    variants[2]["gate"]["chat.warning_rate"] = 0.85
    report, _ = write_sweep_report(tmp_path / "r.yaml", variants, ["chat.temperature"], goal, tmp_path)
    assert "with it on" not in report.read_text()


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


@pytest.mark.slow
def test_a_sweep_of_the_chat_settings_reuses_every_stage_and_picks_on_the_gate(tmp_path, monkeypatch, capsys):
    from runner.cli.sweep import sweep

    monkeypatch.setenv("TUNEBOOK_CACHE", str(tmp_path / "cache"))
    path = two_stage_recipe(tmp_path, name="gate-sweep")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(
        {"id": f"q{i}", "question": q, "reference": "Call your vet today.", "refer": True, "warn": False}) + "\n"
        for i, q in enumerate(["My dog ate grapes.", "Is my cat too thin?", "My rabbit stopped eating."])))
    with path.open("a") as f:
        f.write("export: {quantization: q8_0}\neval: {data: eval.jsonl, max_tokens: 12}\n")
    sweep(path, set_=["chat.temperature=0.1,1.6"], objective="gate.chat.repetition_mean", max_=None,
          min_=["gate.greedy.stop_rate=0"], maximize=False, export=False, out_dir=None)
    err = capsys.readouterr().err
    folder = RunDir.of(load_recipe(path)).sweep_dir
    result = json.loads((folder / "sweep.json").read_text())
    first, second = result["variants"]
    assert {n: st["action"] for n, st in second["stages"].items()} == {"general": "reuse", "vet": "reuse"}
    assert first["gate"]["greedy.stop_rate"] == second["gate"]["greedy.stop_rate"]  # greedy answers kept
    assert "gate of served: greedy answers were made from the same model and settings before" in err
    chat = [json.loads(f.read_text())["result"] for f in (RunDir.of(load_recipe(path)).gate_kept_dir).glob("*.json")]
    chat = [c for c in chat if c.get("mode") == "chat"]  # drawn at 0.1, then at 1.6
    assert sorted(c["sampling"]["temperature"] for c in chat) == [0.1, 1.6]
    assert chat[0]["answers"] != chat[1]["answers"]
    reps = [v["gate"]["chat.repetition_mean"] for v in result["variants"]]
    assert result["chosen"] == reps.index(min(reps)) and result["floors"] == [["gate", "greedy.stop_rate", 0.0]]
    report = (folder / "report.md").read_text()
    assert "gate.chat.repetition_mean" in report and "gate.greedy.stop_rate" in report and "questions never trained on" in report
    assert first["gate"]["eval_set"] == second["gate"]["eval_set"] and "do not compare" not in report
    second["gate"]["eval_set"] = "another set"
    report, _ = write_sweep_report(path, [first, second], ["chat.temperature"], Goal(("gate", "chat.stop_rate")),
                                   tmp_path / "other")
    assert "do not compare" in report.read_text()
