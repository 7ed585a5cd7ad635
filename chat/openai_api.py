"""An OpenAI-compatible HTTP API over one ChatEngine: `/v1/chat/completions` (streamed or not) and `/v1/models`.

What tools that speak OpenAI's API (the `openai` client, editors, agents) need, on the run's own model:
its chat template, its system prompt when the request brings none, its end-of-turn stops plus the
request's `stop` strings. Requests are decoded together with any others in flight (chat/batcher.py).
A request this server cannot honour (tools, several choices, a conversation longer than the window, bad
JSON, text that is no text, a conversation the chat template refuses) gets a 400 with OpenAI's error shape,
never a 500; a wrong or missing API key a 401; a body larger than any conversation that fits could be a 413;
a request that finds the queue full a 429. A client that leaves stops its reply, streamed or not.
"""
from __future__ import annotations

import asyncio
import json
import math
import secrets
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from chat.engine import ChatEngine, ChatError, Sampling, TemplateRefused

# Requests waiting for a free sequence, per sequence decoded together: beyond it a request is told to come
# back later (429) instead of queueing without end.
WAITING_PER_SEQUENCE = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's request this server reads; others are ignored unless they ask for something
    it cannot do (see `refuse_unsupported`)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    extra = req.model_extra or {}
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if extra.get("tools") or extra.get("functions"):
        raise ApiError(400, "tools and function calling are not supported by this model server", param="tools")
    fmt = extra.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        raise ApiError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    if extra.get("logprobs"):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise ApiError(400, "at most 4 stop sequences", param="stop")


def message_text(message: Message, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages[{index}]: only text content is supported, not {part.type!r}",
                           param=f"messages[{index}].content")
        texts.append(part.text)
    return "\n".join(texts)


def conversation(req: ChatCompletionRequest, system_prompt: str | None) -> list[dict]:
    """The request's messages as the engine takes them: one optional system message first, the run's
    system prompt when the request has none, ending with the user's turn."""
    messages = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role == "system" and i > 0:
            raise ApiError(400, f"messages[{i}]: a system message is only allowed first", param=f"messages[{i}]")
        text = message_text(m, i)
        try:  # a lone surrogate ("\ud800") is valid JSON but no text the tokenizer can read
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"messages[{i}]: the content holds {e.object[e.start]!r}, half of a UTF-16 pair, "
                                "which is not a character", param=f"messages[{i}].content") from None
        messages.append({"role": role, "content": text})
    if messages[0]["role"] != "system" and system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    return messages


class Server:
    """Holds the engine and the settings every request shares."""

    def __init__(self, engine: ChatEngine, model_id: str, system_prompt: str | None = None,
                 api_key: str | None = None, defaults: Sampling | None = None):
        self.engine, self.model_id, self.system_prompt = engine, model_id, system_prompt
        self.api_key, self.defaults = api_key, defaults or Sampling()
        self.created = int(time.time())

    def sampling(self, req: ChatCompletionRequest, max_tokens: int) -> Sampling:
        d = self.defaults
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return Sampling(
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            top_k=d.top_k, repeat_penalty=d.repeat_penalty, min_p=d.min_p, seed=req.seed,
            frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
            max_tokens=max_tokens, stop=stops, logit_bias=self.logit_bias(req),
        )

    def logit_bias(self, req: ChatCompletionRequest) -> dict[int, float]:
        bias = req.logit_bias or {}
        bad = [t for t in bias if not 0 <= t < self.engine.n_vocab]
        if bad:
            raise ApiError(400, f"logit_bias: token {bad[0]} is not in the vocabulary (0..{self.engine.n_vocab - 1})",
                           param="logit_bias")
        nan = [t for t, b in bias.items() if math.isnan(b)]
        if nan:
            raise ApiError(400, f"logit_bias: the bias of token {nan[0]} is not a number", param="logit_bias")
        return {t: max(-100.0, min(100.0, b)) for t, b in bias.items()}

    def start(self, req: ChatCompletionRequest):
        refuse_unsupported(req)
        messages = conversation(req, self.system_prompt)
        wanted = req.max_completion_tokens or req.max_tokens
        engine = self.engine
        busy, waiting = engine.batcher.busy()
        if waiting >= WAITING_PER_SEQUENCE * engine.parallel:
            raise ApiError(429, f"the server is busy: {waiting} requests are waiting; retry in a moment",
                           code="rate_limit_exceeded", kind="rate_limit_error")

        def too_long(total: str) -> ApiError:
            return ApiError(400, f"the conversation is {total} tokens; this model's context window is "
                                 f"{engine.n_ctx} tokens, with room kept for {wanted or 1} reply tokens",
                            code="context_length_exceeded", param="messages")

        if len(messages) > engine.n_ctx:  # every message takes at least a token of the template's
            raise too_long(f"more than {engine.n_ctx}")
        try:  # the whole conversation, once: a request is never shortened, so it fits or it is refused
            total = len(engine.tokenize_prompt(messages))
            if total > engine.prompt_budget(wanted or 1):
                raise too_long(str(total))
            prompt = engine.prepare(messages, wanted or 1)
        except TemplateRefused as e:
            raise ApiError(400, str(e), param="messages") from e
        except ChatError as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from e
        if prompt.dropped_messages or prompt.trimmed_message:
            raise too_long(str(total))
        room = engine.n_ctx - len(prompt.tokens) - 1
        prompt.max_tokens = min(wanted or room, room)  # no max_tokens: the rest of the window
        return engine.start(prompt, self.sampling(req, prompt.max_tokens))


def pieces_in_thread(generation):
    """The generation's text pieces as an async iterator (the engine's iterator blocks)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def work():
        try:
            for piece in generation:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
        except BaseException as e:  # noqa: BLE001 - handed to the event loop
            loop.call_soon_threadsafe(queue.put_nowait, e)
        else:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    threading.Thread(target=work, name="api-reply", daemon=True).start()

    async def pieces():
        try:
            while (piece := await queue.get()) is not done:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            generation.cancel()  # the client went away, or the reply is over

    return pieces()


class BodyLimit:
    """Refuses a request whose Content-Length is over `limit` bytes before its body is read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                response = JSONResponse(error_body(f"the request body is {int(length):,} bytes; this server takes at "
                                                   f"most {self.limit:,}"), status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def cancel_on_disconnect(request: Request, generation) -> None:
    """Stop a reply nobody will read: a client that leaves before a whole (not streamed) reply is ready frees
    its sequence, or its place in the queue, at once."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel()
            return


FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def create_app(server: Server):
    """The ASGI app. A request body beyond what any conversation that fits the window could need (~16 bytes a
    token, at least 1 MiB) is refused as it arrives (413), before it is read into memory and tokenized: by its
    Content-Length in OpenAI's error shape (BodyLimit, outside FastAPI's own limit), or by FastAPI as a body
    sent in chunks grows past it."""
    limit = max(1 << 20, 16 * server.engine.n_ctx)
    return BodyLimit(routes(server, limit), limit)


def routes(server: Server, body_limit: int) -> FastAPI:
    app = FastAPI(title="tunebook", docs_url=None, redoc_url=None, openapi_url=None, max_body_size=body_limit)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.kind, exc.code, exc.param), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """404, 405, a body too large or unreadable: OpenAI's error shape too, so clients show the reason."""
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})"),
                                status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if server.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), server.api_key.encode()):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    def model_card() -> dict:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "tunebook"}

    @app.get("/health")
    async def health():
        busy, waiting = server.engine.batcher.busy()
        return {"status": "ok", "decoding": busy, "waiting": waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.model_id:
            raise ApiError(404, f"no model {model_id!r}; this server has {server.model_id!r}",
                           code="model_not_found", param="model")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        generation = await asyncio.to_thread(server.start, req)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": server.model_id, "system_fingerprint": None}

        def usage() -> dict:
            n_prompt, n_reply = len(generation.prompt.tokens), len(generation.tokens)
            return {"prompt_tokens": n_prompt, "completion_tokens": n_reply, "total_tokens": n_prompt + n_reply}

        if not req.stream:
            watch = asyncio.create_task(cancel_on_disconnect(request, generation))
            try:
                text = "".join([piece async for piece in pieces_in_thread(generation)])
            except ChatError as e:
                raise ApiError(500, str(e), kind="server_error") from e
            finally:
                watch.cancel()
                generation.cancel()  # no-op when it has ended
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": FINISH[generation.finish_reason], "logprobs": None}],
                    "usage": usage()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece in pieces_in_thread(generation):
                    yield chunk({"content": piece})
            except ChatError as e:
                yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
                return
            finally:
                generation.cancel()  # no-op when it has ended; stops it when the client went away
            yield chunk({}, FINISH[generation.finish_reason])
            if include_usage:
                yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
