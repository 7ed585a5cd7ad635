"""The house rules hold and have teeth: lint-imports (the contracts in pyproject.toml) passes on the tree, and
fails on a copy of it with one deliberately wrong import of each kind the contracts forbid."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_tree_keeps_every_contract():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("house")
    for package in ("runner", "eval", "chat"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "chainlit_home"))
    shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize("module, line, contract", [
    ("eval/report.py", "from runner.errors import TunebookError", "never import the runner"),
    ("chat/engine.py", "import eval.perplexity", "chat never imports eval"),
    ("runner/data/split.py", "from runner.train.metrics import read_metrics", "runner follows the flow"),
    ("runner/recipe/plan.py", "from runner.cli import app", "runner follows the flow"),
    ("runner/data/render.py", "from runner.data.tokenize import tokenize_conversations", "no import circles"),
])
def test_a_wrong_import_breaks_a_contract(copy, module, line, contract):
    path = copy / module
    original = path.read_text()
    try:
        # inside a function, as the lazy imports of the code base are: they count too
        path.write_text(original + f"\n\ndef _wrong():\n    {line}\n")
        result = lint(copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout[-3000:]
