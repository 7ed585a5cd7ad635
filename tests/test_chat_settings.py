"""A recipe's `chat:` section: the defaults `tunebook chat` and `tunebook serve` answer with, and the settings the
evaluation gate's `chat` answers are drawn with, so the gate measures what a user of the run's chat meets. A
recipe without it keeps the chat's own defaults, and its gate files stay up to date."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from chat.engine import CHAT_SAMPLING, CHAT_SETTINGS, chat_defaults
from eval.gate import sampling_for
from runner.errors import RecipeError
from runner.measure.gate import _common_inputs, chat_settings
from runner.recipe import ChatConfig, load_recipe
from runner.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_the_chat_section_is_checked_like_every_key():
    recipe = load_recipe(QUICKSTART, ["chat.temperature=0.3", "chat.top_k=20"])
    assert recipe.chat.overrides() == {"temperature": 0.3, "top_k": 20}
    assert load_recipe(QUICKSTART).chat is None
    for bad, said in (("chat.temperature=3", "out of range"), ("chat.top_p=0", "out of range"),
                      ("chat.temp=0.3", "unknown key 'temp'")):
        with pytest.raises(RecipeError, match=said):
            load_recipe(QUICKSTART, [bad])
    assert tuple(ChatConfig.model_fields) == CHAT_SETTINGS  # every key the recipe takes reaches the sampler


def test_the_gate_draws_its_chat_answers_with_the_recipes_settings():
    plain, cooler = load_recipe(QUICKSTART), load_recipe(QUICKSTART, ["chat.temperature=0.3"])
    assert sampling_for("chat", 5, chat_settings(plain)) == replace(CHAT_SAMPLING, seed=5)
    drawn = sampling_for("chat", 5, chat_settings(cooler))
    assert (drawn.temperature, drawn.top_p, drawn.top_k, drawn.seed) == (0.3, CHAT_SAMPLING.top_p, CHAT_SAMPLING.top_k, 5)
    assert sampling_for("greedy", 5, chat_settings(cooler)).temperature == 0.0  # greedy stays the model's own answer
    # Without `chat:` the served gate's inputs are what they were: its file stays up to date. With it they change.
    before = _common_inputs(plain, [], None, ("greedy", "chat"))
    assert before["sampling"]["chat"]["temperature"] == CHAT_SAMPLING.temperature
    after = _common_inputs(cooler, [], None, ("greedy", "chat"))
    assert after["sampling"]["greedy"] == before["sampling"]["greedy"]
    assert after["sampling"]["chat"] != before["sampling"]["chat"]


def test_a_runs_chat_settings_reach_the_chat_and_the_api(tmp_path, monkeypatch):
    import chat.api_server
    import chat.serve
    from chat_support import tiny_gguf
    from runner.cli.chat import chat as chat_command
    from runner.cli.serve import serve as serve_command

    run = tmp_path / "vet"
    run.mkdir()
    (run / "recipe.resolved.yaml").write_text("name: vet\nchat:\n  temperature: 0.3\n  top_p: null\n")
    shutil.copy(tiny_gguf("llama"), run / "vet-q8_0.gguf")
    assert RunDir(run).chat_sampling() == {"temperature": 0.3}

    seen = {}
    monkeypatch.setattr(chat.serve, "serve", lambda *a, **kw: seen.setdefault("chat", kw))
    monkeypatch.setattr(chat.api_server, "serve_api", lambda *a, **kw: seen.setdefault("api", kw))
    chat_command(run, host="127.0.0.1", port=8000, quant=None, parallel=2)
    serve_command(run, host="127.0.0.1", port=8000, api_key=None, quant=None, parallel=2, ctx=256, threads=None)
    assert seen["chat"]["sampling"] == seen["api"]["sampling"] == {"temperature": 0.3}

    # The web chat reads them from its environment (tunebook chat sets it), ignoring what it does not know.
    env = chat.serve.server_env(run / "vet-q8_0.gguf", extra={chat.serve.ENV_SAMPLING: json.dumps({"temperature": 0.3})})
    assert json.loads(env[chat.serve.ENV_SAMPLING]) == {"temperature": 0.3}
    assert chat_defaults({"temperature": 0.3, "seed": 9, "n_ctx": 1}).temperature == 0.3
    assert chat_defaults({"temperature": 0.3, "seed": 9}).seed is None  # a file cannot set the seed


def test_a_space_carries_the_runs_chat_settings(tmp_path):
    from chat_support import tiny_gguf
    from runner.share.space import build_space

    run = tmp_path / "vet"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: vet\nmodel: {base: some/model}\nstages:\n  - name: vet\n"
                                     f"    data: {{source: {ROOT / 'data' / 'vet_qa.jsonl'}, format: messages}}\n"
                                     "    train: {max_steps: 1}\nchat: {temperature: 0.3}\n")
    (run / "recipe.resolved.yaml").write_text("name: vet\nchat:\n  temperature: 0.3\n")
    shutil.copy(tiny_gguf("llama"), run / "vet-q8_0.gguf")
    space = build_space(RunDir(run), out=tmp_path / "space")
    assert json.loads((space / "space.json").read_text())["sampling"] == {"temperature": 0.3}
    assert 'sampling=settings.get("sampling")' in (space / "start.py").read_text()  # what start.py hands to serve()
