"""Usage errors (an unknown command or option, a missing argument, a bad option value) look as typer prints
them, exit with status 2, and never show a traceback; `--verbose` is accepted before or after the command."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import RECIPES, ROOT


def tunebook(*args):
    return subprocess.run([sys.executable, "-m", "runner.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, says", [
    (["trian", "recipes/quickstart.yaml"], "No such command 'trian'. Did you mean 'train'?"),
    (["validate", "--sett", "a=1", "recipes/quickstart.yaml"], "No such option: --sett"),
    (["plan"], "Missing argument"),
    (["plan", "recipes/quickstart.yaml", "--ranks", "two"], "Invalid value for '--ranks'"),
    (["plan", "recipes/quickstart.yaml", "--ranks", "0"], "Invalid value for '--ranks'"),
    (["serve", "model.gguf", "--port", "99999"], "Invalid value for '--port'"),
    (["chat", "model.gguf", "--port", "-1"], "Invalid value for '--port'"),
])
def test_usage_errors_exit_2_as_typer_shows_them(args, says):
    res = tunebook(*args)
    assert res.returncode == 2, res.stderr
    assert says in res.stderr and "Usage: tunebook" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_verbose_before_or_after_the_command():
    for args in (["--verbose", "validate", RECIPES / "quickstart.yaml"], ["validate", RECIPES / "quickstart.yaml", "--verbose"]):
        res = tunebook(*args)
        assert res.returncode == 0 and "✓" in res.stdout, res.stderr
