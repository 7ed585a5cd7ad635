"""Chat engine: one llama.cpp model over a GGUF file, its chat template, replies streamed to many users at once.

The engine knows nothing about Chainlit or HTTP. It

- checks the file is a readable GGUF before llama.cpp touches it (`check_gguf`),
- formats a conversation with the chat template embedded in the GGUF
  (`tokenizer.chat_template`), or with a named fallback format and a warning when there is none,
- trims the conversation to fit the context window: oldest turns first, the system prompt kept,
  an over-long single message cut down instead of crashing,
- streams each reply as text pieces and stops at end-of-turn/EOS, at a stop string, at `max_tokens`, or
  when asked to.

One model serves the whole process. Replies are decoded together (chat/batcher.py): `parallel`
conversations share each decode step, further ones wait in line and can see their place in it
(`Generation.queue_position`). Every method is safe to call from many threads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import random
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from chat import llama_runtime
from chat.batcher import Batcher, Done, Request
from chat.templates import FORMAT_MARKERS, TURN_MARKERS, strip_generation_markers, template_names, template_text

log = logging.getLogger("tunebook.chat")

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)

# Chat formats for a GGUF without an embedded template: the project's named templates (chat/templates/),
# chosen by the special tokens the vocabulary has.
FALLBACK_TEMPLATES = {name: strip_generation_markers(template_text(name)) for name in template_names()}
TRIM_NOTE = " [...]"
# Conversations the servers (web chat, API) decode together; more wait in line.
DEFAULT_PARALLEL = 8


def _complete_utf8_length(data: bytes) -> int:
    """Length of `data` without a trailing, still incomplete UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
        return len(data) if need <= back else len(data) - back
    return len(data)


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _partial_stop_length(text: str, stops: list[str]) -> int:
    """Longest tail of `text` that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class ChatError(Exception):
    """A problem the user can fix (bad model file, impossible settings): shown without a traceback."""

    exit_code = 2  # the CLI's convention for user errors (runner.errors.TunebookError)


class TemplateRefused(ChatError):
    """The model's chat template refused the conversation (e.g. "roles must alternate")."""


@dataclass
class Sampling:
    """How a reply is drawn. The sampler chain is llama-cpp-python's `Llama.generate` one: repetition
    penalties over the last 64 generated tokens, then greedy at temperature 0, else top-k, top-p, min-p,
    temperature and a seeded draw."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None
    min_p: float = 0.05
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # more text that ends the reply (not included)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100 bans it)


# The sampler the web chat answers with unless a user moves its sliders (chat/app.py) or the run's recipe sets
# `chat:` (chat_defaults). The evaluation gate measures the served model with the same, so what report.md says
# is what a chat user meets.
CHAT_SAMPLING = Sampling(temperature=0.7, top_p=0.9, top_k=40, repeat_penalty=1.1, max_tokens=256)
# What a recipe's `chat:` section may set over it (runner/recipe/schema.py ChatConfig).
CHAT_SETTINGS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


def chat_defaults(settings: dict | None = None, **more) -> Sampling:
    """CHAT_SAMPLING with a run's `chat:` settings over it (other keys are ignored: they are read from a file
    or the environment), and `more` over both."""
    return replace(CHAT_SAMPLING, **{**{k: v for k, v in (settings or {}).items() if k in CHAT_SETTINGS}, **more})


@dataclass
class Prompt:
    """A conversation fitted to the context window, ready for `ChatEngine.stream`."""

    tokens: list[int]
    messages: list[dict]  # what the model actually sees, after trimming
    max_tokens: int  # room left for the reply
    dropped_messages: int = 0  # oldest messages left out
    trimmed_message: bool = False  # the newest user message was cut to fit
    notes: list[str] = field(default_factory=list)


def check_gguf(path: str | os.PathLike) -> Path:
    """Return `path` as a Path if it is a readable GGUF file, else raise ChatError saying why."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ChatError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ChatError(f"not a file: {path} (expected a .gguf model file)")
    try:
        with open(path, "rb") as f:
            header = f.read(24)
    except OSError as e:
        raise ChatError(f"cannot read GGUF file {path}: {e.strerror or e}") from e
    if header[:4] != GGUF_MAGIC:
        raise ChatError(
            f"{path} is not a GGUF file (it starts with {header[:4]!r}, expected b'GGUF'). "
            "Export the model with `tunebook export` first."
        )
    if len(header) < 24:
        raise ChatError(f"{path} is truncated ({len(header)} bytes): the GGUF header is incomplete")
    version, n_tensors, _n_kv = struct.unpack("<IQQ", header[4:24])
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise ChatError(f"{path}: unsupported GGUF version {version} (expected 2 or 3)")
    if n_tensors == 0:
        raise ChatError(f"{path} holds no tensors: it is not a model")
    return path


def default_threads() -> int:
    """The cores this process may run on (llama.cpp's own default is half of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Generation:
    """One reply on its way. Iterate for its text pieces; `cancel()` (or closing the iterator) stops it.

    Afterwards `tokens` holds the generated token ids (the end-of-turn token excluded), `text` the reply
    and `finish_reason` why it ended: "stop" (end-of-turn or a stop string), "length" (max tokens or the
    context window) or "cancelled"."""

    def __init__(self, engine: ChatEngine, prompt: Prompt, request: Request, stops: list[str],
                 stop_event: threading.Event | None):
        self.engine, self.prompt, self._request = engine, prompt, request
        self._stops, self._stop_event = stops, stop_event
        self.tokens: list[int] = []
        self.token_times: list[float] = []  # time.perf_counter() when each token reached this reply (benchmarks)
        self.text = ""
        self.finish_reason: str | None = None

    @property
    def queue_position(self) -> int | None:
        """Replies waiting ahead of this one for a free sequence; None once it is being decoded."""
        return self.engine.batcher.queue_position(self._request)

    @property
    def prompt_tokens_reused(self) -> int:
        """Prompt tokens found already in the cache (an earlier turn of the same conversation)."""
        return self._request.reused

    def cancel(self) -> None:
        self._request.cancel()

    def _next(self):
        while True:
            if self._stop_event is not None and self._stop_event.is_set():  # also when tokens are waiting
                self._request.cancel()
                return Done("cancelled")
            try:
                return self._request.out.get(timeout=0.05)
            except queue.Empty:
                pass

    def __iter__(self) -> Iterator[str]:
        data = b""  # the reply's bytes so far
        sent = 0  # characters of self.text already yielded
        engine = self.engine
        try:
            while True:
                item = self._next()
                if isinstance(item, Done):
                    if item.error is not None:
                        raise ChatError(f"generating the reply failed: {item.error}") from item.error
                    self.finish_reason = item.reason
                    break
                self.tokens.append(item)
                self.token_times.append(time.perf_counter())
                data += engine.token_bytes(item)
                text = data[: _complete_utf8_length(data)].decode("utf-8", "replace")
                cut = _first_stop(text, self._stops)
                if cut is not None:
                    self.text = text[:cut]
                    self.finish_reason = "stop"
                    self._request.cancel()
                    break
                self.text = text
                # Hold back a tail that may be the start of a stop string.
                end = len(text) - _partial_stop_length(text, self._stops)
                if end > sent:
                    yield text[sent:end]
                    sent = end
            if len(self.text) > sent:
                yield self.text[sent:]
        finally:
            self._request.cancel()  # no-op once finished; frees the sequence if the caller walked away

    def reply(self) -> str:
        for _ in self:
            pass
        return self.text


class ChatEngine:
    """A GGUF chat model. Create one per process; every method may be called from many threads.

    `parallel` conversations are decoded together, each with a window of `n_ctx` tokens; more wait in line.
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        fallback_format: str | None = None,
        parallel: int = 1,
    ):
        self.path = check_gguf(gguf_path)
        if parallel < 1:
            raise ChatError(f"parallel must be at least 1, not {parallel}")
        llama_cpp = llama_runtime.load()
        from llama_cpp._internals import LlamaContext, LlamaModel

        self.n_threads = n_threads or default_threads()
        self.parallel = parallel
        try:
            self.model = LlamaModel(path_model=str(self.path), params=llama_runtime.model_params(), verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise ChatError(f"llama.cpp could not load {self.path}: {e}") from e
        n_ctx = min(n_ctx, self.model.n_ctx_train())  # a window longer than training is of no use
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * parallel
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = parallel
        params.n_threads = params.n_threads_batch = self.n_threads
        params.kv_unified = False  # each conversation attends to its own cache only
        params.swa_full = True  # sliding-window layers keep every position, so a cached prefix can be reused
        params.no_perf = True
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama-cpp-python's Llama
        try:
            self._context = LlamaContext(model=self.model, params=params, verbose=False)
        except (ValueError, RuntimeError) as e:
            self.model.close()
            raise ChatError(f"llama.cpp could not make a context of {n_ctx} x {parallel} tokens: {e}") from e
        self._llama = llama_cpp
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)

        model = self.model
        eos_id, bos_id = model.token_eos(), model.token_bos()
        self.eos_token = model.token_get_text(eos_id) if eos_id != -1 else ""
        self.bos_token = model.token_get_text(bos_id) if bos_id != -1 else ""
        self.bos_id = bos_id
        self.metadata = model.metadata()

        template = self.metadata.get("tokenizer.chat_template")
        self.template_warning: str | None = None
        if template:
            self.chat_format = "embedded"
        else:
            self.chat_format = fallback_format or self._guess_fallback()
            if self.chat_format not in FALLBACK_TEMPLATES:
                self.close()
                raise ChatError(
                    f"unknown chat format {self.chat_format!r}; choose one of {sorted(FALLBACK_TEMPLATES)}"
                )
            template = FALLBACK_TEMPLATES[self.chat_format]
            self.template_warning = (
                f"{self.path.name} has no chat template (tokenizer.chat_template); using the "
                f"fallback chat format '{self.chat_format}'. Replies may be poor if the model "
                "was not trained on it: export the model with its template embedded."
            )
            log.warning(self.template_warning)
        self.template = template
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._formatter = Jinja2ChatFormatter(template=template, eos_token=self.eos_token, bos_token=self.bos_token)
        # Stop at the end-of-turn markers the template writes: as tokens (special tokens are
        # not printed, so a string match would miss them) and as text (a tokenizer that
        # spells a marker in plain pieces).
        markers = [m for m in TURN_MARKERS if m in template]
        if self.eos_token and self.eos_token in template and self.eos_token not in markers:
            markers.append(self.eos_token)
        self.stop = markers
        self.stop_ids = {eos_id, llama_cpp.llama_vocab_eot(model.vocab)} - {-1}
        for marker in markers:
            ids = self.tokenize(marker, special=True)
            if len(ids) == 1:
                self.stop_ids.add(ids[0])
        self._vocab, self._is_eog = model.vocab, llama_cpp.llama_vocab_is_eog
        self._piece_buffer = threading.local()
        self.batcher = Batcher(llama_cpp, self._context.ctx, parallel, n_batch, self.is_end_token,
                               sample_threads=self.n_threads)
        self.n_ctx = self.batcher.n_ctx

    def is_end_token(self, token: int) -> bool:
        """A token that ends the reply: end-of-turn, EOS, or one of the template's turn markers."""
        return token in self.stop_ids or bool(self._is_eog(self._vocab, token))

    # ---- formatting -------------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        """The text of one token as bytes (special tokens print nothing), as llama.cpp spells it."""
        buffer = getattr(self._piece_buffer, "buffer", None)
        if buffer is None:
            buffer = self._piece_buffer.buffer = (ctypes.c_char * 256)()
        n = self._llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if n < 0:  # longer than the buffer
            buffer = self._piece_buffer.buffer = (ctypes.c_char * -n)()
            n = self._llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        return bytes(buffer[:n])

    def _is_single_token(self, text: str) -> bool:
        return len(self.tokenize(text, special=True)) == 1

    def _guess_fallback(self) -> str:
        for name, marker in FORMAT_MARKERS:
            if self._is_single_token(marker):
                return name
        return "chatml"

    def render(self, messages: list[dict]) -> str:
        try:
            return self._formatter(messages=messages).prompt
        except Exception as e:  # noqa: BLE001 - a template's raise_exception() or a Jinja error
            raise TemplateRefused(f"the model's chat template refused the conversation: {e}") from e

    def tokenize_prompt(self, messages: list[dict]) -> list[int]:
        text = self.render(messages)
        # The tokenizer adds BOS when the model asks for it, unless the template wrote it already.
        writes_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.tokenize(text, special=True, add_bos=not writes_bos)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def _cut_text(self, text: str, n_tokens: int) -> str:
        """The first `n_tokens` tokens of `text`, as text."""
        tokens = self.tokenize(text)[: max(0, n_tokens)]
        return self.model.detokenize(tokens).decode("utf-8", "ignore").lstrip()

    def prompt_budget(self, max_tokens: int) -> int:
        """The most prompt tokens a conversation may take with room kept for `max_tokens` of reply (at most
        half the window)."""
        return self.n_ctx - max(1, min(int(max_tokens), self.n_ctx // 2)) - 1

    def prepare(self, messages: list[dict], max_tokens: int = 256) -> Prompt:
        """Fit `messages` (system?, user, assistant, ..., user) into the context window.

        Room for `max_tokens` of reply is kept (at most half the window). Whole old messages go
        first, oldest first, the system prompt always stays; if the newest message alone is still
        too long it is cut from the end and marked with "[...]".
        """
        return self._prepare(messages, max_tokens)

    def _prepare(self, messages: list[dict], max_tokens: int) -> Prompt:
        if not messages or messages[-1].get("role") != "user":
            raise ChatError("the conversation must end with a user message")
        messages = [{"role": m["role"], "content": str(m.get("content") or "")} for m in messages]
        reply_room = max(1, min(int(max_tokens), self.n_ctx // 2))
        budget = self.prompt_budget(max_tokens)

        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        tokens = self.tokenize_prompt(system + turns)
        dropped = 0
        if len(tokens) > budget and len(turns) > 1:
            # Drop the oldest messages, as few as fit; the history never starts with an assistant turn. The
            # newest user turn alone is the last resort. Fewer messages never render longer, so a binary
            # search finds the first start that fits in a few renders, however long the history.
            starts = [i for i in range(1, len(turns)) if turns[i]["role"] == "user"] or [len(turns) - 1]
            low, high = 0, len(starts) - 1
            fitting = None
            while low <= high:
                middle = (low + high) // 2
                candidate = self.tokenize_prompt(system + turns[starts[middle]:])
                if len(candidate) <= budget:
                    fitting, high = (middle, candidate), middle - 1
                else:
                    low = middle + 1
            start, tokens = fitting if fitting else (len(starts) - 1, None)
            dropped, turns = starts[start], turns[starts[start]:]
            if tokens is None:
                tokens = self.tokenize_prompt(system + turns)

        trimmed = False
        if len(tokens) > budget:
            last = dict(turns[-1])
            content = last["content"]
            overhead = len(self.tokenize_prompt(system + [{"role": "user", "content": TRIM_NOTE}]))
            keep = budget - overhead
            if keep < 1:
                raise ChatError(
                    f"the system prompt alone ({overhead} tokens) does not fit the context window "
                    f"of {self.n_ctx} tokens with room for {reply_room} reply tokens"
                )
            # Token counts shift a little at the cut: shrink until the rendered prompt fits.
            for _ in range(8):
                last["content"] = self._cut_text(content, keep) + TRIM_NOTE
                tokens = self.tokenize_prompt(system + [last])
                if len(tokens) <= budget:
                    break
                keep -= max(1, len(tokens) - budget)
            else:
                raise ChatError("could not trim the message to fit the context window")
            turns = [last]
            trimmed = True

        prompt = Prompt(
            tokens=tokens,
            messages=system + turns,
            max_tokens=min(int(max_tokens), self.n_ctx - len(tokens) - 1),
            dropped_messages=dropped,
            trimmed_message=trimmed,
        )
        if dropped:
            prompt.notes.append(f"{dropped} earlier message(s) left out to fit the context window")
        if trimmed:
            prompt.notes.append(f"your message was cut to fit the context window of {self.n_ctx} tokens")
        return prompt

    # ---- generation -------------------------------------------------------------------------

    def sampler(self, sampling: Sampling):
        """The sampler chain of `Llama.generate` (llama-cpp-python) for these settings."""
        from llama_cpp._internals import LlamaSampler

        sampler = LlamaSampler()
        if sampling.logit_bias:
            sampler.add_logit_bias(self.n_vocab, sampling.logit_bias)
        sampler.add_penalties(self.n_vocab, 64, sampling.repeat_penalty, sampling.frequency_penalty,
                              sampling.presence_penalty)
        if sampling.temperature <= 0.0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(sampling.top_k)
            sampler.add_typical(1.0, 1)
            sampler.add_top_p(sampling.top_p, 1)
            sampler.add_min_p(sampling.min_p, 1)
            sampler.add_temp(sampling.temperature)
            sampler.add_dist(sampling.seed if sampling.seed is not None else random.getrandbits(31))
        return sampler

    def start(
        self,
        prompt: Prompt | list[dict],
        sampling: Sampling | None = None,
        stop_event: threading.Event | None = None,
    ) -> Generation:
        """Queue a reply and return at once; iterate the Generation for its text as it is decoded.

        It stops at an end-of-turn/EOS token, a stop string, `sampling.max_tokens`, the context window,
        `cancel()`, or soon after `stop_event` is set.
        """
        sampling = sampling or CHAT_SAMPLING
        if not isinstance(prompt, Prompt):
            prompt = self.prepare(prompt, sampling.max_tokens)
        return self.start_all([prompt], sampling, stop_event)[0]

    def start_all(self, prompts: list[Prompt], sampling: Sampling | None = None,
                  stop_event: threading.Event | None = None) -> list[Generation]:
        """Queue several replies at once (see `Batcher.submit_all`): up to `parallel` of them are decoded
        together, and the same prompts give the same replies on every call (evaluations), as long as replies end
        on tokens (a stop string is seen only when the reply is read)."""
        sampling = sampling or CHAT_SAMPLING
        requests = [Request(tokens=list(p.tokens), sampler=self.sampler(sampling),
                            max_tokens=max(1, min(int(sampling.max_tokens), p.max_tokens))) for p in prompts]
        if stop_event is not None and stop_event.is_set():
            for request in requests:
                request.cancel()
        try:
            self.batcher.submit_all(requests)
        except (ValueError, RuntimeError) as e:
            for request in requests:
                request.sampler.close()
            raise ChatError(str(e)) from e
        stops = self.stop + [s for s in sampling.stop if s]
        return [Generation(self, p, r, stops, stop_event) for p, r in zip(prompts, requests)]

    def stream(
        self,
        prompt: Prompt | list[dict],
        sampling: Sampling | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield the reply as text pieces (see `start`). Closing the iterator early stops the reply."""
        yield from self.start(prompt, sampling, stop_event)

    def reply(self, messages: list[dict] | Prompt, sampling: Sampling | None = None) -> str:
        """The whole reply at once (tests, scripts)."""
        return self.start(messages, sampling).reply()

    def forget_cached_prompts(self) -> None:
        """Empty the cache of every idle sequence, so the next prompt is read in full (benchmarks)."""
        self.batcher.forget()

    def close(self) -> None:
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()
        if getattr(self, "_context", None) is not None:
            self._context.close()
        self.model.close()
