"""Chat engine: one llama.cpp model over a GGUF file, its chat template, streamed replies.

The engine knows nothing about Chainlit. It

- checks the file is a readable GGUF before llama.cpp touches it (`check_gguf`),
- formats a conversation with the chat template embedded in the GGUF
  (`tokenizer.chat_template`), or with a named fallback format and a warning when there is none,
- trims the conversation to fit the context window: oldest turns first, the system prompt kept,
  an over-long single message cut down instead of crashing,
- streams the reply as text pieces and stops at end-of-turn/EOS, at `max_tokens`, or when asked to.

One `Llama` serves the whole process. llama.cpp contexts are not thread-safe, so every generation
holds `ChatEngine.lock` (tokenizing too): concurrent chat sessions queue and are answered one after another.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chat.templates import FORMAT_MARKERS, TURN_MARKERS, strip_generation_markers, template_names, template_text

log = logging.getLogger("tunebook.chat")

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)

# Chat formats for a GGUF without an embedded template: the project's named templates (chat/templates/),
# chosen by the special tokens the vocabulary has.
FALLBACK_TEMPLATES = {name: strip_generation_markers(template_text(name)) for name in template_names()}
TRIM_NOTE = " [...]"


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


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None


# The sampler the web chat answers with unless a user moves its sliders (chat/app.py). The evaluation gate
# measures the served model with it too, so what report.md says is what a chat user meets.
CHAT_SAMPLING = Sampling(temperature=0.7, top_p=0.9, top_k=40, repeat_penalty=1.1, max_tokens=256)


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


def cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def safe_batch_size(requested: int) -> int:
    """A prompt batch size that does not crash this llama.cpp build on this CPU.

    llama.cpp built with its native AMX kernels segfaults on AMX Xeons for any batch larger
    than one token on quantized weights (llama.cpp#20824). A build with GGML_NATIVE=OFF has
    no AMX kernels and is safe; a build with them falls back to one token at a time.
    """
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    if "AMX_INT8 = 1" in info and cpu_has_amx():
        log.warning(
            "llama.cpp was built with AMX kernels, which crash on this CPU for batches > 1 "
            "(llama.cpp#20824): evaluating prompts one token at a time. Rebuild with "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall --no-cache-dir llama-cpp-python'
        )
        return 1
    return requested


class ChatEngine:
    """A GGUF chat model. Create one per process; `stream` is safe to call from many threads."""

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        fallback_format: str | None = None,
    ):
        self.path = check_gguf(gguf_path)
        # Imported here so that `import chat.serve` (the CLI) stays light.
        import llama_cpp
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from .llama_log import route_llama_logs

        route_llama_logs()

        self.lock = threading.RLock()  # reentrant: a caller may hold it across prepare + stream
        self.n_threads = n_threads or default_threads()

        n_batch = safe_batch_size(n_batch)
        try:
            self.llm = Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_gpu_layers=0,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise ChatError(f"llama.cpp could not load {self.path}: {e}") from e
        self.n_ctx = self.llm.n_ctx()

        model = self.llm._model
        eos_id = self.llm.token_eos()
        bos_id = self.llm.token_bos()
        self.eos_token = model.token_get_text(eos_id) if eos_id != -1 else ""
        self.bos_token = model.token_get_text(bos_id) if bos_id != -1 else ""
        self.bos_id = bos_id

        template = self.llm.metadata.get("tokenizer.chat_template")
        self.template_warning: str | None = None
        if template:
            self.chat_format = "embedded"
        else:
            self.chat_format = fallback_format or self._guess_fallback()
            if self.chat_format not in FALLBACK_TEMPLATES:
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
        self._formatter = Jinja2ChatFormatter(
            template=template, eos_token=self.eos_token, bos_token=self.bos_token
        )
        # Stop at the end-of-turn markers the template writes: as tokens (special tokens are
        # not printed, so a string match would miss them) and as text (a tokenizer that
        # spells a marker in plain pieces).
        markers = [m for m in TURN_MARKERS if m in template]
        if self.eos_token and self.eos_token in template and self.eos_token not in markers:
            markers.append(self.eos_token)
        self.stop = markers
        self.stop_ids = {eos_id, llama_cpp.llama_vocab_eot(model.vocab)} - {-1}
        for marker in markers:
            ids = self.llm.tokenize(marker.encode("utf-8"), add_bos=False, special=True)
            if len(ids) == 1:
                self.stop_ids.add(ids[0])
        self._vocab, self._is_eog = model.vocab, llama_cpp.llama_vocab_is_eog

    def is_end_token(self, token: int) -> bool:
        """A token that ends the reply: end-of-turn, EOS, or one of the template's turn markers."""
        return token in self.stop_ids or bool(self._is_eog(self._vocab, token))

    # ---- formatting -------------------------------------------------------------------------

    def _is_single_token(self, text: str) -> bool:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)) == 1

    def _guess_fallback(self) -> str:
        for name, marker in FORMAT_MARKERS:
            if self._is_single_token(marker):
                return name
        return "chatml"

    def render(self, messages: list[dict]) -> str:
        return self._formatter(messages=messages).prompt

    def tokenize_prompt(self, messages: list[dict]) -> list[int]:
        text = self.render(messages)
        # The tokenizer adds BOS when the model asks for it, unless the template wrote it already.
        writes_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=not writes_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _cut_text(self, text: str, n_tokens: int) -> str:
        """The first `n_tokens` tokens of `text`, as text."""
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[: max(0, n_tokens)]
        return self.llm.detokenize(tokens).decode("utf-8", "ignore").lstrip()

    def prepare(self, messages: list[dict], max_tokens: int = 256) -> Prompt:
        """Fit `messages` (system?, user, assistant, ..., user) into the context window.

        Room for `max_tokens` of reply is kept (at most half the window). Whole old messages go
        first, oldest first, the system prompt always stays; if the newest message alone is still
        too long it is cut from the end and marked with "[...]".
        """
        with self.lock:
            return self._prepare(messages, max_tokens)

    def _prepare(self, messages: list[dict], max_tokens: int) -> Prompt:
        if not messages or messages[-1].get("role") != "user":
            raise ChatError("the conversation must end with a user message")
        messages = [{"role": m["role"], "content": str(m.get("content") or "")} for m in messages]
        reply_room = max(1, min(int(max_tokens), self.n_ctx // 2))
        budget = self.n_ctx - reply_room - 1

        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        dropped = 0
        tokens = self.tokenize_prompt(system + turns)
        while len(tokens) > budget and len(turns) > 1:
            # Drop the oldest message; never leave the history starting with an assistant turn.
            turns = turns[1:]
            dropped += 1
            while len(turns) > 1 and turns[0]["role"] != "user":
                turns = turns[1:]
                dropped += 1
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

    def stream(
        self,
        prompt: Prompt | list[dict],
        sampling: Sampling | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield the reply as text pieces. Holds the engine lock until exhausted or closed.

        Stops at an end-of-turn/EOS token, at `sampling.max_tokens`, or as soon as `stop_event`
        is set. Close the generator (or exhaust it) to release the lock: `contextlib.closing`.
        """
        sampling = sampling or CHAT_SAMPLING
        if not isinstance(prompt, Prompt):
            prompt = self.prepare(prompt, sampling.max_tokens)
        max_tokens = max(1, min(int(sampling.max_tokens), prompt.max_tokens))
        with self.lock:
            if stop_event is not None and stop_event.is_set():
                return
            llm = self.llm
            llm.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
            tokens = llm.generate(
                prompt.tokens,
                temp=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                repeat_penalty=sampling.repeat_penalty,
            )
            completion: list[int] = []
            text, sent = "", 0  # the reply so far, and how much of it was yielded
            try:
                for token in tokens:
                    if stop_event is not None and stop_event.is_set():
                        return
                    if self.is_end_token(token):
                        break
                    completion.append(token)
                    raw = llm.detokenize(completion, prev_tokens=prompt.tokens)
                    text = raw[: _complete_utf8_length(raw)].decode("utf-8", "replace")
                    cut = _first_stop(text, self.stop)
                    if cut is not None:
                        text = text[:cut]
                        break
                    # Hold back a tail that may be the start of a stop string.
                    end = len(text) - _partial_stop_length(text, self.stop)
                    if end > sent:
                        yield text[sent:end]
                        sent = end
                    if len(completion) >= max_tokens:
                        break
                if len(text) > sent:
                    yield text[sent:]
            finally:
                tokens.close()

    def reply(self, messages: list[dict], sampling: Sampling | None = None) -> str:
        """The whole reply at once (tests, scripts)."""
        return "".join(self.stream(messages, sampling))

    def close(self) -> None:
        with self.lock:
            self.llm.close()
