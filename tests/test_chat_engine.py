"""Chat engine and Chainlit handlers, in process.

Engine tests run the real Gemma 3 270M GGUF (no chat template: the fallback path). Handler tests call
chat/app.py's Chainlit callbacks in a real Chainlit session context with a scripted engine, so they
check streaming, history, stop and errors without timing on a model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from chat.engine import (
    ChatEngine,
    ChatError,
    Prompt,
    Sampling,
    _complete_utf8_length,
    _first_stop,
    _partial_stop_length,
    check_gguf,
    safe_batch_size,
)
from chat.serve import ENV_THREADS, free_port, start_server, wait_ready
from chat_support import ROOT, TEST_THREADS, gemma_270m_gguf, tiny_gguf

SYSTEM = "You are VetAI, a careful assistant for pet owners."


# ---- the GGUF file ----------------------------------------------------------------------------


def gguf_header(version=3, n_tensors=1, n_kv=0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"", "not a GGUF file"),
        (b"PK\x03\x04 a zip, not a model", "not a GGUF file"),
        (b"GGUF\x03\x00", "truncated"),
        (gguf_header(version=7), "unsupported GGUF version 7"),
        (gguf_header(n_tensors=0), "no tensors"),
    ],
)
def test_bad_gguf_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ChatError, match=message):
        check_gguf(path)
    with pytest.raises(ChatError, match=message):
        ChatEngine(path)  # before llama.cpp sees it


def test_directory_is_not_a_gguf(tmp_path):
    with pytest.raises(ChatError, match="not a file"):
        check_gguf(tmp_path)


def test_corrupt_gguf_stops_the_server_before_it_starts(tmp_path):
    bad = tmp_path / "run-q8_0.gguf"
    bad.write_bytes(b"<html>404</html>")
    with pytest.raises(ChatError, match="not a GGUF file"):
        start_server(bad, port=1)  # no process is started: the port is never tried


@pytest.mark.slow
def test_serve_runs_until_terminated_and_writes_nothing_where_it_was_started(tmp_path):
    import psutil

    user_dir = tmp_path / "user"
    user_dir.mkdir()
    port = free_port()
    code = f"from chat.serve import serve; serve({str(tiny_gguf('llama'))!r}, port={port}, title='PetHelper')"
    env = {**os.environ, ENV_THREADS: str(TEST_THREADS), "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=user_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, "127.0.0.1", port, timeout=120, log_path=tmp_path / "serve.log")
            (server,) = psutil.Process(proc.pid).children()
            proc.terminate()  # SIGTERM: serve() takes the Chainlit server down with it
            assert proc.wait(30) == 0
            psutil.wait_procs([server], timeout=10)
            assert not server.is_running()
        finally:
            proc.kill()
    assert list(user_dir.iterdir()) == []  # no .chainlit/, .files/ or chainlit.md in the user's folder


# ---- streaming text helpers ------------------------------------------------------------------


def test_stop_string_helpers():
    assert _first_stop("Hello<end_of_turn>junk", ["<end_of_turn>"]) == 5
    assert _first_stop("Hello", ["<end_of_turn>"]) is None
    assert _partial_stop_length("Hello<end_of", ["<end_of_turn>"]) == len("<end_of")
    assert _partial_stop_length("a < b", ["<end_of_turn>"]) == 0
    euro = "€".encode()  # three bytes
    assert _complete_utf8_length(b"ab" + euro[:2]) == 2
    assert _complete_utf8_length(b"ab" + euro) == 5


def test_amx_build_on_an_amx_cpu_falls_back_to_one_token_batches(monkeypatch, caplog):
    import llama_cpp

    import chat.engine

    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"CPU : AVX512 = 1 | AMX_INT8 = 1 |")
    monkeypatch.setattr(chat.engine, "cpu_has_amx", lambda: True)
    with caplog.at_level(logging.WARNING, logger="tunebook.chat"):
        assert safe_batch_size(512) == 1
    assert "GGML_NATIVE=OFF" in caplog.text
    monkeypatch.setattr(chat.engine, "cpu_has_amx", lambda: False)
    assert safe_batch_size(512) == 512
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"CPU : AVX512 = 1 |")
    monkeypatch.setattr(chat.engine, "cpu_has_amx", lambda: True)
    assert safe_batch_size(512) == 512  # built with GGML_NATIVE=OFF: no AMX kernels


# ---- the engine on a real model --------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    engine = ChatEngine(gemma_270m_gguf(), n_ctx=512, n_threads=TEST_THREADS)
    yield engine
    engine.close()


def conversation(user: str, turns: int = 0, words: int = 40) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i}: " + "my dog coughs at night " * (words // 5)})
        messages.append({"role": "assistant", "content": f"answer {i}: " + "see a veterinarian soon " * (words // 4)})
    messages.append({"role": "user", "content": user})
    return messages


@pytest.mark.slow
def test_gguf_without_template_falls_back_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="tunebook.chat"):
        engine = ChatEngine(gemma_270m_gguf(), n_ctx=256)
    assert engine.chat_format == "gemma"  # the vocabulary has <start_of_turn>
    assert "no chat template" in engine.template_warning
    assert any("fallback chat format 'gemma'" in r.getMessage() for r in caplog.records)
    text = engine.render(conversation("Is chocolate bad for dogs?"))
    assert text.startswith("<bos><start_of_turn>user\n" + SYSTEM)  # Gemma has no system role
    assert text.endswith("Is chocolate bad for dogs?<end_of_turn>\n<start_of_turn>model\n")
    assert engine.tokenize_prompt(conversation("hi")).count(engine.bos_id) == 1
    assert engine.n_threads == len(os.sched_getaffinity(0))  # every core this process may use
    engine.close()
    with pytest.raises(ChatError, match="unknown chat format"):
        ChatEngine(gemma_270m_gguf(), n_ctx=256, fallback_format="alpaca")


@pytest.mark.slow
@pytest.mark.parametrize("kind, end_of_turn", [("llama", "<|eot_id|>"), ("gemma", "<end_of_turn>")])
def test_embedded_template_is_used_and_the_reply_ends_at_end_of_turn(kind, end_of_turn, caplog):
    import tiny_gguf_models

    with caplog.at_level(logging.WARNING, logger="tunebook.chat"):
        engine = ChatEngine(tiny_gguf(kind), n_ctx=256, n_threads=TEST_THREADS)
    try:
        assert engine.chat_format == "embedded" and engine.template_warning is None
        assert not caplog.records
        assert end_of_turn in engine.stop
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": tiny_gguf_models.QUESTION}]
        # Taught to answer REPLY and end its turn: the reply stops there, well before max_tokens.
        assert engine.reply(messages, Sampling(temperature=0.0, max_tokens=64)) == tiny_gguf_models.REPLY
    finally:
        engine.close()


@pytest.mark.slow
def test_long_history_drops_oldest_turns_and_keeps_the_system_prompt(engine):
    messages = conversation("And what about fleas?", turns=12)
    assert len(engine.tokenize_prompt(messages)) > engine.n_ctx  # too long as it is
    prompt = engine.prepare(messages, max_tokens=64)
    assert prompt.messages[0] == messages[0]  # system prompt kept
    assert prompt.messages[-1] == messages[-1]  # newest question kept whole
    assert prompt.messages[1]["role"] == "user"  # never starts mid-exchange
    assert prompt.messages[1:] == messages[-(len(prompt.messages) - 1):]  # newest turns, in order
    assert prompt.dropped_messages == len(messages) - len(prompt.messages) > 0
    assert not prompt.trimmed_message
    assert len(prompt.tokens) + 64 < engine.n_ctx
    assert prompt.notes


@pytest.mark.slow
def test_over_long_message_is_trimmed_not_a_crash(engine):
    essay = "My rabbit stopped eating hay and sits hunched in a corner. " * 400  # ~5000 tokens
    prompt = engine.prepare(conversation(essay, turns=2), max_tokens=64)
    assert prompt.trimmed_message
    assert [m["role"] for m in prompt.messages] == ["system", "user"]
    assert prompt.messages[-1]["content"].startswith("My rabbit stopped eating hay")
    assert prompt.messages[-1]["content"].endswith("[...]")
    assert len(prompt.tokens) + 64 < engine.n_ctx
    reply = "".join(engine.stream(prompt, Sampling(max_tokens=8, seed=1)))
    assert reply.strip()


@pytest.mark.slow
def test_system_prompt_too_long_for_the_window_is_a_clear_error(engine):
    messages = [{"role": "system", "content": "Be careful. " * 400}, {"role": "user", "content": "hi"}]
    with pytest.raises(ChatError, match="system prompt alone"):
        engine.prepare(messages, max_tokens=64)


@pytest.mark.slow
def test_stream_yields_text_pieces_and_respects_max_tokens(engine):
    pieces = list(engine.stream(conversation("My cat is sneezing. What should I do?"), Sampling(max_tokens=16, seed=3)))
    assert len(pieces) > 1 and all(isinstance(p, str) for p in pieces)
    text = "".join(pieces)
    assert text.strip()
    assert engine.count_tokens(text) <= 16 + 2  # re-tokenizing may merge or split a little


@pytest.mark.slow
def test_stop_event_ends_generation_at_once(engine):
    stop = threading.Event()
    pieces = []
    for piece in engine.stream(conversation("Tell me all about dog breeds."), Sampling(max_tokens=200, seed=4), stop):
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    assert len(pieces) == 3
    assert engine.lock.acquire(blocking=False)  # released when the stream ended
    engine.lock.release()


def scripted_generate(engine, text: str):
    """Replace llm.generate by one that yields `text` (tokenized with special tokens) then junk."""
    tokens = engine.llm.tokenize(text.encode(), add_bos=False, special=True)
    junk = engine.llm.tokenize(b" JUNK AFTER THE END", add_bos=False, special=False)

    def generate(prompt_tokens, **kwargs):
        yield from tokens + junk

    return generate


@pytest.mark.slow
@pytest.mark.parametrize(
    "scripted, expected",
    [
        ("Give water.<end_of_turn>", "Give water."),  # end-of-turn token
        ("Give water.<eos>", "Give water."),  # EOS token
        ("Rest.<start_of_turn>user\nmore", "Rest."),  # the model starting the next turn
    ],
)
def test_generation_stops_at_end_of_turn_and_eos(engine, monkeypatch, scripted, expected):
    monkeypatch.setattr(engine.llm, "generate", scripted_generate(engine, scripted))
    assert engine.reply(conversation("What now?"), Sampling(max_tokens=64)) == expected


@pytest.mark.slow
def test_end_of_turn_spelled_as_plain_text_also_stops(engine, monkeypatch):
    tokens = engine.llm.tokenize(b"Keep her warm.<end_of_turn> JUNK", add_bos=False, special=False)
    assert engine.llm.detokenize(tokens).decode().count("<end_of_turn>") == 1  # plain pieces, not the token

    def generate(prompt_tokens, **kwargs):
        yield from tokens

    monkeypatch.setattr(engine.llm, "generate", generate)
    assert engine.reply(conversation("What now?"), Sampling(max_tokens=64)) == "Keep her warm."


@pytest.mark.slow
def test_concurrent_streams_queue_on_the_lock_and_match_sequential_results(engine):
    questions = ["Why does my dog eat grass?", "How often should I feed a kitten?", "Can rabbits eat carrots?"]
    greedy = Sampling(temperature=0.0, max_tokens=12, seed=0)
    sequential = [engine.reply(conversation(q), greedy) for q in questions]
    results = [None] * len(questions)

    def run(i):
        results[i] = engine.reply(conversation(questions[i]), greedy)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == sequential


# ---- Chainlit handlers (chat/app.py) with a scripted engine ------------------------------------


class ScriptedEngine:
    """Stands in for ChatEngine: records what it was asked, streams canned pieces."""

    def __init__(self, tmp_path: Path):
        self.path = tmp_path / "vet-q8_0.gguf"
        self.n_ctx, self.n_threads = 2048, 2
        self.template_warning = None
        self.lock = threading.RLock()
        self.seen: list[list[dict]] = []
        self.fail_next = False
        self.slow = False
        self.notes: list[str] = []

    def prepare(self, messages, max_tokens=256):
        return Prompt(tokens=[1, 2, 3], messages=[dict(m) for m in messages], max_tokens=max_tokens, notes=list(self.notes))

    def stream(self, prompt, sampling=None, stop_event=None):
        self.seen.append(prompt.messages)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("llama_decode returned -3")
        question = prompt.messages[-1]["content"]
        for i, piece in enumerate(["You asked: ", question, ". ", "See a vet."] if not self.slow else ["tick "] * 500):
            if stop_event is not None and stop_event.is_set():
                return
            if self.slow:
                time.sleep(0.01)
            yield piece


@pytest.fixture(scope="module")
def app_module(tmp_path_factory):
    """chat/app.py imported with Chainlit's app root in a scratch copy of chat/chainlit_home."""
    home = tmp_path_factory.mktemp("chainlit_home")
    shutil.copytree(Path(__file__).resolve().parents[1] / "chat" / "chainlit_home", home, dirs_exist_ok=True)
    os.environ["CHAINLIT_APP_ROOT"] = str(home)
    with warnings.catch_warnings():  # chainlit's traceloop dependency still uses pydantic v1 idioms
        warnings.simplefilter("ignore", DeprecationWarning)
        import chainlit.config

        assert chainlit.config.APP_ROOT == str(home), "chainlit was imported before its app root was set"
        import chat.app

    return chat.app


class Browser:
    """One Chainlit websocket session whose emitted events are recorded."""

    def __init__(self):
        from chainlit.session import WebsocketSession

        self.events: list[tuple[str, dict]] = []

        async def emit(event, data):
            self.events.append((event, data))

        async def emit_call(event, data, timeout):
            return None

        self.session = WebsocketSession(
            id=str(uuid.uuid4()), socket_id=str(uuid.uuid4()), emit=emit, emit_call=emit_call,
            user_env={}, client_type="webapp",
        )

    def enter(self):
        from chainlit.context import init_ws_context

        init_ws_context(self.session)

    async def start(self, app):
        self.enter()
        await app.start()

    async def say(self, text: str):
        import chainlit as cl
        from chainlit.config import config

        self.enter()
        await config.code.on_message(cl.Message(content=text, author="User", type="user_message"))

    def messages(self, kind="new_message"):
        return [d for e, d in self.events if e == kind]

    def replies(self):
        return [d["output"] for d in self.messages() if d.get("type") == "assistant_message"]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def scripted(app_module, tmp_path, monkeypatch):
    engine = ScriptedEngine(tmp_path)
    app_module.set_engine(engine)
    monkeypatch.delenv("TUNEBOOK_CHAT_DEBUG_LOG", raising=False)
    yield engine
    app_module.set_engine(None)


def test_reply_is_streamed_and_history_kept(app_module, scripted):
    async def scenario():
        tab = Browser()
        await tab.start(app_module)
        assert tab.messages("chat_settings")  # temperature, top_p, max tokens
        await tab.say("Is my puppy too thin?")
        await tab.say("What should he eat?")
        return tab

    tab = run(scenario())
    assert tab.messages("stream_start") and tab.messages("stream_token")
    assert tab.replies() == ["You asked: Is my puppy too thin?. See a vet.", "You asked: What should he eat?. See a vet."]
    second = scripted.seen[1]
    assert second[0] == {"role": "system", "content": app_module.VETAI_SYSTEM_PROMPT}
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == "You asked: Is my puppy too thin?. See a vet."


def test_sessions_keep_separate_histories(app_module, scripted):
    async def scenario():
        a, b = Browser(), Browser()
        await a.start(app_module)
        await b.start(app_module)
        await asyncio.gather(a.say("A1"), b.say("B1"))
        await asyncio.gather(b.say("B2"), a.say("A2"))

    run(scenario())
    histories = {tuple(m["content"] for m in seen if m["role"] == "user") for seen in scripted.seen}
    assert ("A1", "A2") in histories and ("B1", "B2") in histories
    assert not any({"A1", "B1"} <= set(h) for h in histories)


def test_error_during_generation_is_shown_and_the_session_keeps_working(app_module, scripted):
    async def scenario():
        tab = Browser()
        await tab.start(app_module)
        scripted.fail_next = True
        await tab.say("first")
        await tab.say("second")
        return tab

    tab = run(scenario())
    errors = [d for d in tab.messages() if d.get("isError")]
    assert len(errors) == 1 and "llama_decode returned -3" in errors[0]["output"]
    assert tab.replies()[-1] == "You asked: second. See a vet."
    assert [m["content"] for m in scripted.seen[-1] if m["role"] == "user"] == ["second"]  # failed turn not kept


def test_stop_button_stops_the_stream_and_the_session_goes_on(app_module, scripted):
    scripted.slow = True

    async def scenario():
        tab = Browser()
        await tab.start(app_module)
        task = asyncio.create_task(tab.say("tell me everything"))
        while not tab.messages("stream_token"):
            await asyncio.sleep(0.01)
        tab.enter()
        await app_module.stop()  # what Chainlit calls on the stop button (after cancelling the task)
        await asyncio.wait_for(task, 2)
        tokens_when_stopped = len(tab.messages("stream_token"))
        await asyncio.sleep(0.2)
        assert len(tab.messages("stream_token")) == tokens_when_stopped
        scripted.slow = False
        await tab.say("short one")
        return tab

    tab = run(scenario())
    stopped, last = tab.replies()[-2:]
    assert 0 < stopped.count("tick") < 500
    assert last == "You asked: short one. See a vet."


def test_trim_notes_are_shown(app_module, scripted):
    scripted.notes = ["your message was cut to fit the context window of 2048 tokens"]

    async def scenario():
        tab = Browser()
        await tab.start(app_module)
        await tab.say("x" * 100)
        return tab

    assert "cut to fit" in run(scenario()).replies()[-1]


def test_welcome_starters_and_settings(app_module, scripted):
    profiles = run(app_module.chat_profiles())
    assert len(profiles) == 1 and profiles[0].default
    text = profiles[0].markdown_description
    assert "not a substitute for a veterinarian" in text
    assert "vet-q8_0.gguf" in text  # the served model file
    assert len(profiles[0].starters) >= 3
    assert all(s.message.endswith("?") for s in run(app_module.starters()))
    s = app_module.sampling_from({"temperature": "9", "top_p": 0, "max_tokens": 1e9})
    assert (s.temperature, s.top_p, s.max_tokens) == (2.0, 0.05, 4096)
    assert app_module.sampling_from({"temperature": "hot"}).temperature == app_module.DEFAULT_SAMPLING.temperature


def test_debug_log_records_each_generation(app_module, scripted, tmp_path, monkeypatch):
    log = tmp_path / "seen.jsonl"
    monkeypatch.setenv("TUNEBOOK_CHAT_DEBUG_LOG", str(log))

    async def scenario():
        tab = Browser()
        await tab.start(app_module)
        await tab.say("hello")
        return tab.session.id

    session_id = run(scenario())
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["session"] == session_id
    assert record["messages"][-1] == {"role": "user", "content": "hello"}
