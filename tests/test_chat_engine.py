"""Chat engine and Chainlit handlers, in process.

Engine tests run the real Gemma 3 270M GGUF (no chat template: the fallback path) and the tiny exported
models (confident replies, so replies decoded together can be compared token for token with replies decoded
alone). Handler tests call chat/app.py's Chainlit callbacks in a real Chainlit session context with a
scripted engine, so they check streaming, the waiting status, history, stop and errors without timing on a
model.
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
import types
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
def test_a_long_history_is_fitted_in_a_few_renders_as_dropping_one_by_one_would(engine, monkeypatch):
    """Dropping the oldest message and rendering again, one at a time, costs a render per message: quadratic in
    the history (800 short messages took ~9 s of CPU). The fit is found by bisection instead, to the same end."""
    messages = conversation("And what about fleas?", turns=200, words=5)
    renders = []
    real = engine.tokenize_prompt
    monkeypatch.setattr(engine, "tokenize_prompt", lambda m: renders.append(len(m)) or real(m))
    prompt = engine.prepare(messages, max_tokens=64)
    assert len(renders) <= 12, renders  # log2(200) and the whole history once
    monkeypatch.undo()
    system, turns = messages[:1], messages[1:]
    budget = engine.prompt_budget(64)
    start = next(i for i in range(1, len(turns)) if turns[i]["role"] == "user"
                 and len(engine.tokenize_prompt(system + turns[i:])) <= budget)  # the one-by-one rule's answer
    assert prompt.dropped_messages == start and prompt.messages == system + turns[start:]
    assert len(engine.tokenize_prompt(system + turns[start - 2:])) > budget  # one exchange more would not fit


@pytest.mark.slow
def test_a_chat_template_that_refuses_a_conversation_is_a_chat_error(engine, monkeypatch):
    from chat.engine import TemplateRefused
    from chat.openai_api import ApiError, ChatCompletionRequest, Server

    def alternate(messages, **_):  # what a template's raise_exception() does
        raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(engine, "_formatter", alternate)
    with pytest.raises(TemplateRefused, match="refused the conversation: Conversation roles must alternate"):
        engine.prepare([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ApiError) as caught:  # `tunebook serve`: a 400 with the template's reason, not a 500
        Server(engine, "m").start(request)
    assert caught.value.status == 400 and "roles must alternate" in caught.value.message


@pytest.mark.slow
def test_a_full_queue_is_told_to_come_back_later(engine, monkeypatch):
    from chat.openai_api import WAITING_PER_SEQUENCE, ApiError, ChatCompletionRequest, Server

    # The queue as it is with WAITING_PER_SEQUENCE requests per sequence waiting (filling it for real takes a
    # long reply and that many clients): the next request is a 429, not one more in an endless line.
    monkeypatch.setattr(engine.batcher, "busy", lambda: (engine.parallel, WAITING_PER_SEQUENCE * engine.parallel))
    with pytest.raises(ApiError) as caught:
        Server(engine, "m").start(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]))
    assert caught.value.status == 429 and caught.value.code == "rate_limit_exceeded"


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
    generation = engine.start(conversation("Tell me all about dog breeds."), Sampling(max_tokens=200, seed=4), stop)
    for piece in generation:
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    assert 3 <= len(pieces) <= 5  # a token or two may be on its way when the event is set
    assert generation.finish_reason == "cancelled" and len(generation.tokens) < 20
    wait_idle(engine)  # the sequence is free for the next reply


def wait_idle(engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.batcher.busy() != (0, 0):
        assert time.monotonic() < deadline, f"still busy: {engine.batcher.busy()}"
        time.sleep(0.01)


def scripted_sampling(engine, monkeypatch, text: str, special: bool = True):
    """Make the engine draw the tokens of `text` (then junk) instead of sampling: the decode stays real."""
    tokens = engine.tokenize(text, special=special) + engine.tokenize(" JUNK AFTER THE END")
    drawn = {}

    def sample(request, index):
        n = drawn[id(request)] = drawn.get(id(request), -1) + 1
        return tokens[min(n, len(tokens) - 1)]

    monkeypatch.setattr(engine.batcher, "sample", sample)
    return tokens


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
    scripted_sampling(engine, monkeypatch, scripted)
    generation = engine.start(conversation("What now?"), Sampling(max_tokens=64))
    assert generation.reply() == expected
    assert generation.finish_reason == "stop"


@pytest.mark.slow
def test_end_of_turn_spelled_as_plain_text_also_stops(engine, monkeypatch):
    tokens = scripted_sampling(engine, monkeypatch, "Keep her warm.<end_of_turn> JUNK", special=False)
    assert engine.detokenize(tokens).count("<end_of_turn>") == 1  # plain pieces, not the token
    assert engine.reply(conversation("What now?"), Sampling(max_tokens=64)) == "Keep her warm."


@pytest.mark.slow
def test_stop_strings_of_the_request_end_the_reply(engine, monkeypatch):
    scripted_sampling(engine, monkeypatch, "Walk him twice a day. ### Next topic", special=False)
    generation = engine.start(conversation("What now?"), Sampling(max_tokens=64, stop=["###"]))
    assert generation.reply() == "Walk him twice a day. "
    assert generation.finish_reason == "stop"


@pytest.mark.slow
def test_sampler_chain_is_llama_cpp_pythons_own(engine):
    """A reply alone draws exactly the tokens llama-cpp-python's Llama.generate draws with the same settings."""
    from chat.llama_runtime import open_llama

    prompt = engine.prepare(conversation("Why does my dog eat grass?"), 16)
    fresh = ChatEngine(gemma_270m_gguf(), n_ctx=512, n_threads=TEST_THREADS)  # no cache from other tests
    llm = open_llama(gemma_270m_gguf(), n_ctx=512, n_threads=TEST_THREADS, verbose=False)
    try:
        for sampling in (Sampling(temperature=0.0, max_tokens=16, seed=0), Sampling(temperature=0.7, max_tokens=16, seed=5)):
            generation = fresh.start(prompt, sampling)
            generation.reply()
            llm.set_seed(sampling.seed)
            theirs = []
            for token in llm.generate(prompt.tokens, temp=sampling.temperature, top_p=sampling.top_p,
                                      top_k=sampling.top_k, repeat_penalty=sampling.repeat_penalty):
                theirs.append(token)
                if len(theirs) == len(generation.tokens):
                    break
            assert generation.tokens == theirs and len(theirs) > 4
    finally:
        fresh.close()
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_replies_decoded_together_match_replies_decoded_alone(kind):
    """Several conversations share each decode step (batches of several tokens on a Q8_0 model) and give the
    replies they give one at a time."""
    import tiny_gguf_models

    engine = ChatEngine(tiny_gguf(kind), n_ctx=256, n_threads=TEST_THREADS, parallel=3)
    try:
        asks = [[{"role": "system", "content": system}, {"role": "user", "content": tiny_gguf_models.QUESTION}]
                for system in (SYSTEM, "You help with cats.", "Answer briefly.")]
        greedy = Sampling(temperature=0.0, max_tokens=24)
        alone = [engine.reply(a, greedy) for a in asks]
        steps_alone = engine.batcher.steps
        prompts = [engine.prepare(a, greedy.max_tokens) for a in asks]
        with engine.batcher._cv:  # all three queued before the decode thread admits any (a tiny model's reply
            generations = [engine.start(p, greedy) for p in prompts]  # can end before the next is even queued)
        together = [None] * len(asks)
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, generations[i].reply()))
                   for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert together == alone and alone[0] == tiny_gguf_models.REPLY
        assert engine.batcher.largest_batch == 3  # three replies in one decode step
        assert engine.batcher.steps - steps_alone <= steps_alone / 2  # far fewer steps than one at a time
    finally:
        engine.close()


@pytest.mark.slow
def test_a_reply_waits_in_line_for_a_free_sequence_and_sees_its_place():
    engine = ChatEngine(tiny_gguf("llama"), n_ctx=256, n_threads=TEST_THREADS, parallel=1)
    try:
        long = Sampling(temperature=0.0, max_tokens=200, logit_bias={t: -100.0 for t in engine.stop_ids})
        first = engine.start([{"role": "user", "content": "Tell me about dogs."}], long)
        second = engine.start([{"role": "user", "content": "And cats?"}], long)
        third = engine.start([{"role": "user", "content": "And birds?"}],
                             Sampling(temperature=0.0, max_tokens=4, logit_bias=long.logit_bias))
        pieces = iter(first)
        next(pieces)
        assert (first.queue_position, second.queue_position, third.queue_position) == (None, 0, 1)
        second.cancel()  # leaves the line
        first.cancel()
        third.reply()
        assert third.finish_reason == "length" and len(third.tokens) == 4
        assert second.finish_reason is None and list(second) == [] and second.finish_reason == "cancelled"
    finally:
        engine.close()


@pytest.mark.slow
def test_the_next_turn_of_a_conversation_reads_only_its_new_tokens():
    import tiny_gguf_models

    engine = ChatEngine(tiny_gguf("llama"), n_ctx=256, n_threads=TEST_THREADS, parallel=2)
    try:
        turn = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": tiny_gguf_models.QUESTION}]
        first = engine.start(turn, Sampling(temperature=0.0, max_tokens=24))
        reply = first.reply()
        engine.reply([{"role": "user", "content": "Something else entirely."}], Sampling(max_tokens=4))
        second = engine.start(turn + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}],
                              Sampling(temperature=0.0, max_tokens=8))
        second.reply()
        # its own earlier turn is still cached in one of the two sequences: only the new turn is read
        assert second.prompt_tokens_reused >= len(first.prompt.tokens)
    finally:
        engine.close()


# ---- Chainlit handlers (chat/app.py) with a scripted engine ------------------------------------


class ScriptedGeneration:
    """Stands in for chat.engine.Generation: canned pieces, after `waits` reads of a place in line."""

    def __init__(self, engine, prompt, stop_event):
        self.engine, self.prompt, self.stop_event = engine, prompt, stop_event
        self.places = list(engine.places)  # what queue_position reads, one after the other, then None
        self.cancelled = False

    @property
    def queue_position(self):
        return self.places.pop(0) if self.places else None

    def cancel(self):
        self.cancelled = True

    def __iter__(self):
        engine = self.engine
        while self.places:  # waiting in line
            time.sleep(0.05)
        if engine.fail_next:
            engine.fail_next = False
            raise ChatError("generating the reply failed: llama_decode returned -3")
        question = self.prompt.messages[-1]["content"]
        for piece in ["You asked: ", question, ". ", "See a vet."] if not engine.slow else ["tick "] * 500:
            if self.cancelled or (self.stop_event is not None and self.stop_event.is_set()):
                return
            if engine.slow:
                time.sleep(0.01)
            yield piece


class ScriptedEngine:
    """Stands in for ChatEngine: records what it was asked, streams canned pieces."""

    def __init__(self, tmp_path: Path):
        self.path = tmp_path / "vet-q8_0.gguf"
        self.n_ctx, self.n_threads, self.parallel = 2048, 2, 4
        self.template_warning = None
        self.seen: list[list[dict]] = []
        self.fail_next = False
        self.slow = False
        self.notes: list[str] = []
        self.places: list[int] = []  # places in line a reply goes through before its first piece
        self.batcher = types.SimpleNamespace(busy=lambda: (1, 0))

    def prepare(self, messages, max_tokens=256):
        return Prompt(tokens=[1, 2, 3], messages=[dict(m) for m in messages], max_tokens=max_tokens, notes=list(self.notes))

    def start(self, prompt, sampling=None, stop_event=None):
        self.seen.append(prompt.messages)
        return ScriptedGeneration(self, prompt, stop_event)


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


def shown(tab) -> list[str]:
    """What the reply showed on screen, one entry per stream event (a sequence token replaces the text)."""
    texts, current = [], ""
    for event, data in tab.events:
        if event == "stream_start":
            current = data["output"]
        elif event == "stream_token":
            current = data["token"] if data["isSequence"] else current + data["token"]
        else:
            continue
        texts.append(current)
    return texts


def test_a_reply_shows_its_place_in_line_at_once_then_the_reply(app_module, scripted):
    scripted.places = [2, 2, 1, 0]

    async def scenario():
        tab = Browser()
        await tab.start(app_module)
        await tab.say("Is my puppy too thin?")
        return tab

    tab = run(scenario())
    states = shown(tab)
    assert states[0] == app_module.READING  # before any work: the message is there at once
    in_line = [s for s in states if "in line" in s]
    assert [s.split("number ")[1].split(" ")[0] for s in in_line] == ["3", "2", "1"]
    assert states[-1] == "You asked: Is my puppy too thin?. See a vet."
    assert all("in line" not in s for s in states[states.index(in_line[-1]) + 1:])  # the reply replaces the status
    assert tab.replies() == ["You asked: Is my puppy too thin?. See a vet."]
    assert [m["content"] for m in scripted.seen[-1] if m["role"] == "user"] == ["Is my puppy too thin?"]


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
