"""The `tunebook` command as a user runs it: exit codes, messages, no tracebacks."""
from __future__ import annotations

import subprocess
import sys

from conftest import RECIPES, ROOT


def tunebook(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "runner.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_validate_all_shipped_recipes_exits_0():
    res = tunebook("validate", *sorted(RECIPES.glob("*.yaml")), *sorted((RECIPES / "defaults").glob("*.yaml")))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("✓") == len(list(RECIPES.glob("*.yaml"))) + len(list((RECIPES / "defaults").glob("*.yaml")))


def test_validate_bad_recipe_exits_2_with_file_line_and_fix(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text(f"extends: {RECIPES / 'finetome-llama-3.2-1b.yaml'}\nname: mine\nlora: {{rank: 16}}\n")
    res = tunebook("validate", bad)
    assert res.returncode == 2
    assert f"{bad}:3:" in res.stderr and "did you mean 'r'?" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_plan_with_unknown_set_path_exits_2():
    res = tunebook("plan", RECIPES / "finetome-llama-3.2-1b.yaml", "--set", "lora.rank=16")
    assert res.returncode == 2
    assert "--set lora.rank=16" in res.stderr and "did you mean 'r'?" in res.stderr
    assert "Traceback" not in res.stderr


def test_plan_shows_the_8b_numbers():
    res = tunebook("plan", RECIPES / "finetome-llama-3.1-8b.yaml")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "LoRA r 32, alpha 32" in text
    assert "learning_rate: 1.0e-4" in text and "1e-4" in text
    assert "optimizer steps │ 500" in text and "effective batch │ 8" in text and "eval every      │ 50 steps" in text


def test_plan_applies_set_overrides():
    res = tunebook("plan", RECIPES / "finetome-llama-3.1-8b.yaml", "--set", "stages.0.train.gradient_accumulation_steps=4")
    assert res.returncode == 0, res.stderr
    assert "effective batch │ 4" in res.stdout


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    res = tunebook("plan", tmp_path / "nope.yaml")
    assert res.returncode == 2 and "file not found" in res.stderr and "Traceback" not in res.stderr


def test_every_command_has_help():
    for cmd in ([], ["validate"], ["plan"]):
        res = tunebook(*cmd, "--help")
        assert res.returncode == 0 and "Usage" in res.stdout, (cmd, res.stderr)
