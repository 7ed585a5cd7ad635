"""VetAI in the browser: a Chainlit app over one GGUF model (chat.engine.ChatEngine).

Started by chat/serve.py (`tunebook chat`), which passes the model path, system prompt and title in
environment variables. Each browser tab is a session with its own history in `cl.user_session`;
all sessions share the one model, which decodes several replies together (chat/batcher.py). A reply
shows at once where it stands (its place in line, or that the model is reading), then streams token by
token from a worker thread; the stop button sets the session's stop event, which ends the reply.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from dataclasses import replace

from chat.serve import CHAINLIT_HOME

# `chainlit run` (chat/serve.py) has set this already; anything else importing this module would
# otherwise make Chainlit write `.chainlit/` and `.files/` into its working directory.
os.environ.setdefault("CHAINLIT_APP_ROOT", str(CHAINLIT_HOME))

import chainlit as cl  # noqa: E402
from chainlit.config import config as chainlit_config  # noqa: E402
from chainlit.input_widget import Slider  # noqa: E402

from chat.engine import (  # noqa: E402
    CHAT_SAMPLING, DEFAULT_PARALLEL, ChatEngine, ChatError, Prompt, Sampling, chat_defaults)
from chat.serve import (  # noqa: E402
    ENV_DEBUG_LOG,
    ENV_MAX_TOKENS,
    ENV_MODEL,
    ENV_N_CTX,
    ENV_PARALLEL,
    ENV_SAMPLING,
    ENV_SYSTEM_PROMPT,
    ENV_THREADS,
    ENV_TITLE,
)

# The persona the quickstart and VetAI recipes train with (recipes/*.yaml, stage `vet`).
VETAI_SYSTEM_PROMPT = (
    "You are VetAI, a careful assistant for pet owners. Give practical, accurate guidance on pet "
    "health and care, say clearly when an animal needs a veterinarian and when it is an emergency, "
    "and never give medication doses: those come from the animal's own veterinarian."
)
DISCLAIMER = (
    "**VetAI is not a substitute for a veterinarian.** Answers can be wrong. If your animal is in "
    "pain, struggling to breathe, bleeding, collapsed or has eaten something poisonous, call a "
    "veterinarian or an emergency clinic now."
)
STARTERS = [
    ("Vomiting dog", "My dog has vomited twice today but is still drinking water. Should I be worried?"),
    ("Cat not eating", "My cat hasn't eaten for a day and is hiding. What could be wrong?"),
    ("Toxic foods", "Which common foods are poisonous to dogs and cats?"),
    ("Puppy vaccines", "What vaccinations does a new puppy need, and when?"),
]


def _run_settings() -> dict:
    """The run's `chat:` settings, as `tunebook chat` passes them (JSON); anything unreadable is ignored."""
    try:
        settings = json.loads(os.environ.get(ENV_SAMPLING) or "{}")
    except ValueError:
        return {}
    return settings if isinstance(settings, dict) else {}


DEFAULT_SAMPLING = chat_defaults(_run_settings(),
                                 max_tokens=int(os.environ.get(ENV_MAX_TOKENS, CHAT_SAMPLING.max_tokens)))

# What a reply shows before its first word (a status, replaced by the reply when it starts).
READING = "_Reading your message…_"
STATUS_PREFIX = "_⏳ "

_engine: ChatEngine | None = None
_engine_lock = threading.Lock()
_debug_lock = threading.Lock()


def system_prompt() -> str:
    return os.environ.get(ENV_SYSTEM_PROMPT, VETAI_SYSTEM_PROMPT)


def title() -> str:
    return os.environ.get(ENV_TITLE) or chainlit_config.ui.name


def get_engine() -> ChatEngine:
    """The process's one engine, loaded from $TUNEBOOK_CHAT_MODEL on first use."""
    global _engine
    with _engine_lock:
        if _engine is None:
            path = os.environ.get(ENV_MODEL)
            if not path:
                raise ChatError(f"no model: set {ENV_MODEL} to a .gguf file (tunebook chat does)")
            threads = os.environ.get(ENV_THREADS)
            _engine = ChatEngine(
                path,
                n_ctx=int(os.environ.get(ENV_N_CTX, "2048")),
                n_threads=int(threads) if threads else None,
                parallel=int(os.environ.get(ENV_PARALLEL, str(DEFAULT_PARALLEL))),
            )
            # Evaluate the system prompt once, so the first visitor's reply starts from a warm cache.
            _engine.reply(with_system([{"role": "user", "content": "Hello"}]), Sampling(max_tokens=1))
        return _engine


def set_engine(engine) -> None:
    """Use `engine` instead of loading one (tests)."""
    global _engine
    _engine = engine


def with_system(turns: list[dict]) -> list[dict]:
    prompt = system_prompt()
    return ([{"role": "system", "content": prompt}] if prompt else []) + turns


def model_line(engine: ChatEngine) -> str:
    threads = f"{engine.n_threads} CPU thread" + ("s" if engine.n_threads != 1 else "")
    line = (f"Model: `{engine.path.name}` · {engine.n_ctx}-token context · llama.cpp on {threads}, "
            f"{engine.parallel} conversation{'s' if engine.parallel != 1 else ''} at a time")
    if engine.template_warning:
        line += f"\n\n⚠️ {engine.template_warning}"
    return line


def welcome_text(engine: ChatEngine) -> str:
    return (
        f"Hello! I'm {title()}. Ask me about your pet's health, behaviour, food or care.\n\n"
        f"{DISCLAIMER}\n\n{model_line(engine)}"
    )


def sampling_from(settings: dict | None) -> Sampling:
    """Chat-settings values, clamped to sane ranges (the browser can send anything)."""
    settings = settings or {}

    def number(key, default, low, high, cast=float):
        try:
            return cast(min(high, max(low, float(settings.get(key, default)))))
        except (TypeError, ValueError):
            return default

    return replace(
        DEFAULT_SAMPLING,  # top_k and repeat_penalty have no slider: the defaults hold
        temperature=number("temperature", DEFAULT_SAMPLING.temperature, 0.0, 2.0),
        top_p=number("top_p", DEFAULT_SAMPLING.top_p, 0.05, 1.0),
        max_tokens=number("max_tokens", DEFAULT_SAMPLING.max_tokens, 1, 4096, int),
    )


def record_for_tests(session_id: str, prompt: Prompt, engine: ChatEngine) -> None:
    """With $TUNEBOOK_CHAT_DEBUG_LOG set, append what this generation saw and how many other replies the model
    was decoding or had waiting when it came (tests check histories and that replies run together)."""
    path = os.environ.get(ENV_DEBUG_LOG)
    if not path:
        return
    decoding, waiting = engine.batcher.busy()
    line = json.dumps({"session": session_id, "messages": prompt.messages, "decoding": decoding, "waiting": waiting})
    with _debug_lock, open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


if os.environ.get(ENV_MODEL):
    # Load at import: Chainlit imports this module before it starts listening, so a bad model file
    # stops `tunebook chat` with a clear message instead of failing on the first question.
    if os.environ.get(ENV_TITLE):
        chainlit_config.ui.name = os.environ[ENV_TITLE]
    try:
        get_engine()
    except ChatError as e:
        raise SystemExit(f"tunebook chat: {e}") from None


@cl.set_chat_profiles
async def chat_profiles(user=None, language=None):
    # One profile: Chainlit then shows its description (welcome, disclaimer, model) and starters
    # on the empty chat screen, and no profile picker.
    return [
        cl.ChatProfile(
            name=title(),
            markdown_description=welcome_text(get_engine()),
            icon="/public/vetai.svg",
            default=True,
            starters=await starters(user, language),
        )
    ]


@cl.set_starters
async def starters(user=None, language=None):
    return [cl.Starter(label=label, message=message) for label, message in STARTERS]


@cl.on_chat_start
async def start():
    cl.user_session.set("history", [])
    await cl.ChatSettings(
        [
            Slider(id="temperature", label="Temperature", initial=DEFAULT_SAMPLING.temperature,
                   min=0, max=2, step=0.05, description="Higher is more varied, 0 is deterministic."),
            Slider(id="top_p", label="Top-p", initial=DEFAULT_SAMPLING.top_p, min=0.05, max=1, step=0.05,
                   description="Sample only from the most likely tokens making up this probability."),
            Slider(id="max_tokens", label="Max reply tokens", initial=DEFAULT_SAMPLING.max_tokens,
                   min=min(16, DEFAULT_SAMPLING.max_tokens), max=max(1024, DEFAULT_SAMPLING.max_tokens),
                   step=16, description="Longest reply, in tokens."),
        ]
    ).send()


@cl.on_stop
async def stop():
    if event := cl.user_session.get("stop_event"):
        event.set()


@cl.on_message
async def on_message(message: cl.Message):
    history: list[dict] = cl.user_session.get("history") or []
    # A new event per reply: a stopped generation still finishing in its thread keeps its own.
    stop_event = threading.Event()
    cl.user_session.set("stop_event", stop_event)
    sampling = sampling_from(cl.user_session.get("chat_settings"))
    messages = with_system(history + [{"role": "user", "content": message.content}])

    reply = cl.Message(content="")
    try:
        prompt, text = await stream_reply(get_engine(), messages, sampling, stop_event, reply, cl.user_session.get("id"))
    except asyncio.CancelledError:
        # The stop button cancels this task; keep what was written so far.
        stop_event.set()
        if reply.content:
            history += [{"role": "user", "content": message.content}, {"role": "assistant", "content": reply.content}]
            cl.user_session.set("history", history)
        elif reply.streaming:
            asyncio.ensure_future(reply.remove())  # stopped before its first word: take the status away
        raise
    except Exception as e:  # noqa: BLE001 - shown in the chat; the session keeps working
        if reply.streaming:
            await reply.remove()  # the status line
        await cl.ErrorMessage(content=f"Sorry, generating a reply failed: {e}").send()
        return

    if not text:
        reply.content = "_(no reply: the model ended its turn at once)_"
    await reply.send()
    # The history keeps what the model saw (a trimmed message stays trimmed) plus its reply.
    history = [m for m in prompt.messages if m["role"] != "system"]
    history.append({"role": "assistant", "content": text})
    cl.user_session.set("history", history)
    if prompt.notes:
        await cl.Message(content="_Note: " + "; ".join(prompt.notes) + "._", author=title()).send()


def status_text(position: int | None) -> str:
    """What the reply shows before its first word: its place in line, or that the model is reading."""
    if position is None:
        return READING
    return f"{STATUS_PREFIX}Waiting for the model: you are number {position + 1} in line…_"


async def stream_reply(
    engine: ChatEngine,
    messages: list[dict],
    sampling: Sampling,
    stop_event: threading.Event,
    reply: cl.Message,
    session_id: str | None,
) -> tuple[Prompt, str]:
    """Show the reply's status at once, then stream its text into `reply`. Returns the fitted prompt and the
    reply text (the status is never part of it)."""
    loop = asyncio.get_running_loop()
    await reply.stream_token(READING, is_sequence=True)  # on screen at once, before any work
    prompt = await asyncio.to_thread(engine.prepare, messages, sampling.max_tokens)
    record_for_tests(session_id or "", prompt, engine)
    generation = engine.start(prompt, sampling, stop_event)
    pieces: asyncio.Queue = asyncio.Queue()
    done = object()

    def work():
        try:
            for piece in generation:
                loop.call_soon_threadsafe(pieces.put_nowait, piece)
        except BaseException as e:  # noqa: BLE001 - handed to the event loop
            loop.call_soon_threadsafe(pieces.put_nowait, e)
        else:
            loop.call_soon_threadsafe(pieces.put_nowait, done)

    threading.Thread(target=work, name="chat-reply", daemon=True).start()
    shown, text, getter = READING, "", None
    try:
        while True:
            getter = getter or asyncio.ensure_future(pieces.get())  # kept across timeouts: no piece is lost
            finished, _ = await asyncio.wait({getter}, timeout=0.5 if not text else None)
            if not finished:  # no word yet: keep the place in line up to date
                status = status_text(generation.queue_position)
                if status != shown:
                    shown = status
                    await reply.stream_token(status, is_sequence=True)
                continue
            piece, getter = getter.result(), None
            if piece is done:
                break
            if isinstance(piece, BaseException):
                raise piece
            first = not text
            text += piece
            await reply.stream_token(text if first else piece, is_sequence=first)  # the first word replaces the status
    except BaseException:
        generation.cancel()
        if getter is not None:
            getter.cancel()
        reply.content = text
        raise
    reply.content = text
    return prompt, text
