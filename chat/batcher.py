"""Continuous batching: many replies decoded together in one llama.cpp context.

One thread owns the context. Each step it builds one batch holding the next token of every reply being
generated and, in the room left (`n_batch`), the next slice of prompts still being read; one `llama_decode`
serves them all, and each reply samples its own token from its own logits with its own sampler. A decode
step reads the weights once whatever the number of replies in it, so replies that run together cost little
more than one alone, and nobody waits for another reply to finish.

The context has `parallel` sequences of `n_ctx` tokens each. A request waits in line (first come, first
served) until a sequence is free, then takes the free sequence whose cached tokens share the longest start
with its prompt (a conversation's next turn finds its own earlier turns still there), so only the new
tokens are read; with nothing worth reusing, the least recently used one. Callers get the tokens through a queue; they can cancel at any time.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("tunebook.chat")


@dataclass
class Done:
    """The last item a request's queue receives."""

    reason: str  # "stop" (end-of-turn token), "length" (max tokens), "cancelled"
    error: BaseException | None = None


@dataclass(eq=False)
class Request:
    tokens: list[int]
    sampler: object  # llama_cpp._internals.LlamaSampler, owned by the request
    max_tokens: int
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    # set by the batcher
    seq: int | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not read yet
    next_token: int | None = None  # sampled, not yet decoded
    generated: int = 0
    reused: int = 0  # prompt tokens found in the cache

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Sequence:
    seq: int
    cached: list[int] = field(default_factory=list)  # the tokens in its KV cache, in order
    request: Request | None = None
    last_used: float = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable(cached: list[int], tokens: list[int]) -> int:
    """Cached tokens a request would reuse from a sequence, counted only when that keeps at least half of what
    the sequence holds: a new conversation sharing just the system prompt takes the least recently used
    sequence instead of wiping another conversation's history."""
    n = common_prefix(cached, tokens)
    return n if 2 * n >= len(cached) else 0


class Batcher:
    """Decodes the requests given to `submit` together on one llama.cpp context (see the module doc).

    `is_end(token)` says whether a sampled token ends a reply (it is then not passed on)."""

    def __init__(self, llama_cpp, ctx, parallel: int, n_batch: int, is_end, sample_threads: int = 1):
        self._llama, self._ctx = llama_cpp, ctx
        self.parallel, self.n_batch = parallel, n_batch
        self.n_ctx = llama_cpp.llama_n_ctx_seq(ctx)  # each sequence's own window
        self._is_end = is_end
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._sequences = [_Sequence(i) for i in range(parallel)]
        # Drawing a token reads the whole vocabulary's logits (262k for Gemma 3): several replies draw at once.
        self._pool = (concurrent.futures.ThreadPoolExecutor(min(sample_threads, parallel), thread_name_prefix="sampler")
                      if min(sample_threads, parallel) > 1 else None)
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._forget = threading.Event()
        self.steps = 0  # decode calls (tests, benchmarks)
        self.largest_batch = 0  # most replies decoded in one step
        self.decode_s = self.sample_s = 0.0  # time in llama_decode and in the samplers (benchmarks)
        self._thread = threading.Thread(target=self._run, name="llama-batcher", daemon=True)
        self._thread.start()

    # ---- callers ---------------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        self.submit_all([request])
        return request

    def submit_all(self, requests: list[Request]) -> None:
        """Queue several requests at once, in order: the decode thread sees all of them or none, so the steps
        it runs (and so the replies, to the last bit) are the same every time the same requests come."""
        for request in requests:
            if not request.tokens:
                raise ValueError("empty prompt")
            if len(request.tokens) >= self.n_ctx:
                raise ValueError(f"prompt of {len(request.tokens)} tokens does not fit {self.n_ctx}")
        with self._cv:
            if self._closing:
                raise RuntimeError("the model is closed")
            self._waiting.extend(requests)
            self._cv.notify()

    def queue_position(self, request: Request) -> int | None:
        """How many requests wait ahead of this one; None once it has a sequence (or is done)."""
        with self._cv:
            for i, r in enumerate(self._waiting):
                if r is request:
                    return i
        return None

    def busy(self) -> tuple[int, int]:
        """(requests being decoded, requests waiting)."""
        with self._cv:
            return sum(s.request is not None for s in self._sequences), len(self._waiting)

    def forget(self) -> None:
        """Drop what idle sequences hold, so the next requests read their prompts in full; returns once done."""
        with self._cv:
            self._forget.set()
            self._cv.notify()
            while self._forget.is_set() and self._thread.is_alive():
                self._cv.wait(0.05)

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._batch is not None and not self._thread.is_alive():
            self._llama.llama_batch_free(self._batch)
            self._batch = None

    # ---- the decode thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self._waiting and not self._active() and not self._forget.is_set():
                    self._cv.wait()
                if self._closing:
                    break
                if self._forget.is_set():
                    for s in self._sequences:
                        if s.request is None:
                            self._llama.llama_memory_seq_rm(self._memory, s.seq, -1, -1)
                            s.cached = []
                    self._forget.clear()
                    self._cv.notify_all()
                self._drop_cancelled_waiting()
                self._admit()
            self._finish_cancelled()
            if self._active():
                try:
                    self._step()
                except Exception as error:  # noqa: BLE001 - every reply in flight gets it; the thread goes on
                    self._fail_active(error)
        for s in self._sequences:
            if s.request is not None:
                self._finish(s, Done("cancelled"))
        while self._waiting:
            self._waiting.popleft().out.put(Done("cancelled"))

    def _active(self) -> list[_Sequence]:
        return [s for s in self._sequences if s.request is not None]

    def _drop_cancelled_waiting(self) -> None:
        for r in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(r)
            r.out.put(Done("cancelled"))

    def _admit(self) -> None:
        """Give free sequences to waiting requests, in order, each the free one sharing most of its prompt."""
        while self._waiting:
            free = [s for s in self._sequences if s.request is None]
            if not free:
                return
            request = self._waiting.popleft()
            best = max(free, key=lambda s: (reusable(s.cached, request.tokens), -s.last_used))
            keep = min(common_prefix(best.cached, request.tokens), len(request.tokens) - 1)  # read >= 1 token
            if not self._llama.llama_memory_seq_rm(self._memory, best.seq, keep, -1):
                self._llama.llama_memory_seq_rm(self._memory, best.seq, -1, -1)
                keep = 0
            best.cached = best.cached[:keep]
            best.request, best.last_used = request, time.monotonic()
            request.seq, request.reused, request.pending = best.seq, keep, list(request.tokens[keep:])

    def _finish(self, s: _Sequence, done: Done) -> None:
        request, s.request = s.request, None
        s.last_used = time.monotonic()
        request.sampler.close()
        request.out.put(done)

    def sample(self, request: Request, index: int) -> int:
        """The request's next token, drawn by its sampler from the logits at batch position `index`."""
        return self._llama.llama_sampler_sample(request.sampler.sampler, self._ctx, index)

    def _fail_active(self, error: BaseException) -> None:
        active = self._active()
        log.error("decoding failed (%s): ending the %d replies in the batch", error, len(active))
        for s in active:
            self._llama.llama_memory_seq_rm(self._memory, s.seq, -1, -1)
            s.cached = []
            self._finish(s, Done("error", error))

    def _finish_cancelled(self) -> None:
        for s in self._active():
            if s.request.cancelled.is_set():
                self._finish(s, Done("cancelled"))

    def _step(self) -> None:
        """One llama_decode: every generating reply's next token, then prompt slices in the room left."""
        batch, n = self._batch, 0
        sample_at: list[tuple[_Sequence, int]] = []  # (sequence, batch index of its last token)
        read: dict[int, int] = {}  # sequence -> prompt tokens in this batch

        def add(s: _Sequence, tokens: list[int], sample: bool) -> None:
            nonlocal n
            for i, token in enumerate(tokens):
                batch.token[n], batch.pos[n] = token, len(s.cached) + i
                batch.n_seq_id[n], batch.seq_id[n][0] = 1, s.seq
                batch.logits[n] = sample and i == len(tokens) - 1
                n += 1
            if sample:
                sample_at.append((s, n - 1))

        active = self._active()
        generating = [s for s in active if s.request.next_token is not None]
        for s in generating:
            add(s, [s.request.next_token], True)
        for s in sorted((s for s in active if s.request.pending), key=lambda s: s.request.submitted):
            room = self.n_batch - n
            if room <= 0:
                break
            chunk = s.request.pending[:room]
            read[s.seq] = len(chunk)
            add(s, chunk, len(chunk) == len(s.request.pending))
        batch.n_tokens = n
        self.largest_batch = max(self.largest_batch, len(generating))

        started = time.perf_counter()
        code = self._llama.llama_decode(self._ctx, batch)
        self.decode_s += time.perf_counter() - started
        self.steps += 1
        if code != 0:
            self._fail_active(RuntimeError(f"llama_decode returned {code}"))
            return

        # The batch is in the cache now: record it, then sample where logits were asked for.
        for s in generating:
            s.cached.append(s.request.next_token)
            s.request.next_token = None
        for seq, count in read.items():
            s = self._sequences[seq]
            s.cached.extend(s.request.pending[:count])
            del s.request.pending[:count]
        started = time.perf_counter()
        if self._pool is not None and len(sample_at) > 1:
            # Sort and synchronize the outputs here, once: the samplers (each its own) then only read the logits.
            self._llama.llama_get_logits(self._ctx)
            tokens = list(self._pool.map(lambda item: self.sample(item[0].request, item[1]), sample_at))
        else:
            tokens = [self.sample(s.request, index) for s, index in sample_at]
        self.sample_s += time.perf_counter() - started
        for (s, _), token in zip(sample_at, tokens):
            r = s.request
            if self._is_end(token):
                self._finish(s, Done("stop"))
                continue
            r.generated += 1
            r.out.put(token)
            if r.generated >= r.max_tokens or len(s.cached) >= self.n_ctx:
                self._finish(s, Done("length"))
            else:
                r.next_token = token
