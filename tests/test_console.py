"""The console: a bar with rate and ETA on a terminal, plain lines without one, silence for small work and
other ranks, and llama.cpp's log lines kept off unless asked for."""
from __future__ import annotations

import subprocess
import sys

import pytest

from runner import console
from runner.console import duration, progress, rate_text


def test_rate_and_duration_read_well():
    assert rate_text(3, 1.5, "steps") == "2.0 steps/s"
    assert rate_text(2, 56.2, "steps") == "28.1 s/step" and rate_text(1, 9, "batches") == "9.0 s/batch"
    assert rate_text(0, 10, "steps") == ""
    assert duration(65) == "1:05" and duration(3725) == "1:02:05"


def test_plain_lines_without_a_terminal(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(console, "_terminal", lambda: False)
    with progress("training general", 4, "steps") as bar:
        now[0] = 10
        bar.advance(status="loss 2.5")       # 10 s after the start: no line yet (PLAIN_EVERY is 30 s)
        now[0] = 20
        bar.advance()
        now[0] = 30
        bar.advance()                         # 30 s: a line with the rate and the ETA
        with progress("evaluating general", 2, "batches") as inner:
            inner.advance(2)                  # a bar inside another one: no start or end line
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "training general: 0/4 steps"
    assert lines[1] == "training general: 3/4 steps, 10.0 s/step, ETA 0:10, loss 2.5"
    assert lines[-1].startswith("training general: 3/4 steps, in ")
    assert not any("evaluating" in line for line in lines)


def test_a_callback_moves_the_bar_and_sets_its_total(monkeypatch):
    monkeypatch.setattr(console, "_terminal", lambda: False)
    with progress("evaluating", None, "batches") as bar:
        bar.callback()(3, 12)
        assert (bar.completed, bar.total) == (3, 12)
    with progress("forgetting matrix", 100, "examples") as bar:
        bar.callback(offset=50, span=25)(6, 12)   # half of a 25-example set, after the first 50
        assert (bar.completed, bar.total) == (62.5, 100)


def test_a_terminal_gets_a_bar_with_rate_and_eta(monkeypatch, capsys):
    monkeypatch.setattr(console, "_terminal", lambda: True)
    with progress("merging", 3, "steps") as bar:
        assert bar.live
        bar.advance(status="merging vet/adapter")
        bar.advance(2)
    err = capsys.readouterr().err
    assert "merging" in err and "3/3 steps" in err and "done in" in err


def test_small_work_and_other_ranks_stay_quiet(monkeypatch, capsys):
    monkeypatch.setattr(console, "_terminal", lambda: False)
    with progress("tokenizing", 5, "conversations", min_total=200) as bar:
        bar.advance(5)
    monkeypatch.setenv("RANK", "1")
    with progress("training general", 4, "steps") as bar:
        bar.advance(4)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("verbose", [False, True])
def test_llama_cpp_log_lines_only_when_verbose(tmp_path, verbose):
    """A real GGUF loaded by real llama.cpp: its log lines reach stderr only with TUNEBOOK_VERBOSE=1."""
    from runner.export.gguf_writer import write_gguf
    from tiny_gguf_models import llama_tokenizer, save, tiny_llama

    tokenizer = llama_tokenizer()
    gguf = write_gguf(save(tiny_llama(tokenizer), tokenizer, tmp_path / "m"), tmp_path / "m.gguf", "f32")
    code = ("from chat.llama_runtime import open_llama; "  # loads the CPU backend, routes the log lines
            f"open_llama({str(gguf)!r}, n_ctx=32, verbose=False).close()")
    env = {"TUNEBOOK_VERBOSE": "1" if verbose else "0", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=console.__file__.rsplit("/runner/", 1)[0])
    assert res.returncode == 0, res.stderr
    assert ("llama_context" in res.stderr) == verbose, res.stderr[-2000:]
