"""`tunebook serve`: the OpenAI-compatible API, run as the real command and used through the real `openai` client.

On the tiny exported Llama (embedded template; it answers tiny_gguf_models.QUESTION with REPLY and ends its
turn) and, where a reply must take long, on Gemma 3 270M with its end-of-turn tokens banned by `logit_bias`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from chat_support import ARTIFACTS, ROOT, gemma_270m_gguf, running_api, tiny_gguf


def client(url: str, key: str = "unused", **kwargs):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120, **kwargs)


def post(url: str, body: bytes, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def tiny_api():
    with running_api(ARTIFACTS / "api-tiny-server.log", tiny_gguf("llama"), "--parallel", "4") as (url, proc):
        yield url, proc


@pytest.mark.slow
def test_streams_a_chat_completion_with_the_openai_client(tiny_api):
    import tiny_gguf_models

    url, _ = tiny_api
    api = client(url)
    assert [m.id for m in api.models.list().data] == ["tiny-llama-q8_0"]
    stream = api.chat.completions.create(model="tiny-llama-q8_0", temperature=0, stream=True,
                                         stream_options={"include_usage": True},
                                         messages=[{"role": "user", "content": tiny_gguf_models.QUESTION}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tiny_gguf_models.REPLY  # the template, the reply, the stop at end-of-turn
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 1 and chunks[-1].usage.prompt_tokens > 10

    whole = api.chat.completions.create(model="anything", temperature=0, max_tokens=3,
                                        messages=[{"role": "user", "content": tiny_gguf_models.QUESTION}])
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 3
    assert tiny_gguf_models.REPLY.startswith(whole.choices[0].message.content)
    stopped = api.chat.completions.create(model="m", temperature=0, stop=["hurt"],
                                          messages=[{"role": "user", "content": tiny_gguf_models.QUESTION}])
    assert stopped.choices[0].message.content == tiny_gguf_models.REPLY.split("hurt")[0]


@pytest.mark.slow
@pytest.mark.parametrize("body, where", [
    (b"{not json", "not valid JSON"),
    (b'{"model": "m"}', "messages"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "tool", "content": "x"}]}', "messages.0.role"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n=1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 7}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', "tools"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', "text content"),
    (b'{"messages": [{"role": "assistant", "content": "hi"}]}', "last message"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": -100}}', "vocabulary"),
    (json.dumps({"messages": [{"role": "user", "content": "dog " * 3000}]}).encode(), "context window"),
    (json.dumps({"messages": [{"role": r, "content": "hello there"} for r in ["user", "assistant"] * 800 + ["user"]]})
     .encode(), "context window"),  # 1,601 messages: refused without rendering 800 shorter histories
    (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "half of a UTF-16 pair"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": NaN}}', "not a number"),
])
def test_a_malformed_request_is_a_400_and_the_server_stays_up(tiny_api, body, where):
    import tiny_gguf_models

    url, proc = tiny_api
    status, answer = post(f"{url}/chat/completions", body)
    assert status == 400 and where in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert proc.poll() is None
    reply = client(url).chat.completions.create(model="m", temperature=0,
                                                messages=[{"role": "user", "content": tiny_gguf_models.QUESTION}])
    assert reply.choices[0].message.content == tiny_gguf_models.REPLY


@pytest.mark.slow
def test_other_http_errors_have_the_openai_shape_and_a_huge_body_is_refused_as_it_comes(tiny_api):
    import socket

    url, proc = tiny_api
    for method, path, body, status in [("GET", "/nothing", None, 404), ("GET", "/chat/completions", None, 405),
                                       ("POST", "/chat/completions", b'{"messages": "\xff\xfe"}', 400)]:
        request = urllib.request.Request(url + path, data=body, method=method,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == status
        error = json.loads(caught.value.read())["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
    # 3 MiB announced: the answer comes from the header alone, before one byte of the body is sent
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 3145728\r\n\r\n")
        answer = b""
        while b"}}" not in answer and (chunk := conn.recv(65536)):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert "takes at most 1,048,576" in json.loads(body)["error"]["message"]
    assert proc.poll() is None


@pytest.mark.slow
def test_a_client_that_leaves_before_a_whole_reply_frees_its_sequence():
    """A reply that is not streamed is decoded for nobody once its client has gone: Gemma 3 270M with its
    end-of-turn tokens banned would write 1,500 tokens (a minute here); the client closes after one second."""
    import socket

    ends = [special_token_id(t) for t in ("<end_of_turn>", "<eos>")]
    with running_api(ARTIFACTS / "api-disconnect-server.log", gemma_270m_gguf(), "--parallel", "1") as (url, _proc):
        host, port = url.split("//")[1].split("/")[0].split(":")
        body = json.dumps({"messages": [{"role": "user", "content": "Tell me about dogs."}], "max_tokens": 1500,
                           "logit_bias": {str(t): -100 for t in ends}}).encode()
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

            def health() -> dict:
                with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as r:
                    return json.loads(r.read())

            deadline = time.monotonic() + 60
            while health()["decoding"] == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert health()["decoding"] == 1  # the reply is being written
            time.sleep(1)
        deadline = time.monotonic() + 30
        while health()["decoding"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health() == {"status": "ok", "decoding": 0, "waiting": 0}
        reply = client(url).chat.completions.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "Hi!"}])
        assert reply.usage.completion_tokens >= 1  # the sequence serves the next client

        # a stopping server gives a reply in flight SHUTDOWN_GRACE_S, not the minute it would take to finish
        from chat.api_server import SHUTDOWN_GRACE_S

        streamed = []
        stream = client(url).chat.completions.create(model="m", max_tokens=1500, stream=True,
                                                     logit_bias={str(t): -100 for t in ends},
                                                     messages=[{"role": "user", "content": "Tell me about dogs."}])
        def read():
            try:
                for chunk in stream:
                    streamed.append(chunk)
            except openai.APIError:  # the server went away mid-reply: what this checks
                pass

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 60
        while not streamed and time.monotonic() < deadline:
            time.sleep(0.1)
        assert streamed
        _proc.terminate()
        _proc.wait(timeout=SHUTDOWN_GRACE_S + 20)
        assert len(streamed) < 1000  # cut, not finished


@pytest.mark.slow
def test_a_second_client_is_not_blocked_by_a_long_reply():
    """Client A streams a long reply (Gemma 3 270M, end-of-turn banned, 300 tokens); client B, sent once A has
    started, gets its whole short reply while A is still streaming."""
    with running_api(ARTIFACTS / "api-concurrency-server.log", gemma_270m_gguf(), "--parallel", "2") as (url, _proc):
        api = client(url)
        ends = [special_token_id(t) for t in ("<end_of_turn>", "<eos>")]
        a_times, b_done, a_started = [], {}, threading.Event()

        def a():
            stream = api.chat.completions.create(
                model="m", stream=True, max_tokens=300, temperature=0.7, seed=1,
                logit_bias={str(t): -100 for t in ends}, messages=[{"role": "user", "content": "Tell me about dogs."}])
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    a_times.append(time.monotonic())
                    a_started.set()

        thread = threading.Thread(target=a)
        thread.start()
        assert a_started.wait(120)
        b = api.chat.completions.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "Hi!"}])
        b_done["t"] = time.monotonic()
        thread.join(300)
    assert b.choices[0].message.content is not None and b.usage.completion_tokens >= 1
    after_b = [t for t in a_times if t > b_done["t"]]
    assert after_b, "A had finished before B's reply came: B was blocked behind it"
    print(f"A: {len(a_times)} pieces, {len(after_b)} of them after B's whole reply came")


def special_token_id(text: str) -> int:
    """The id of a special token, read from the model's vocabulary through llama.cpp (not from the API)."""
    from chat.llama_runtime import open_llama

    llm = open_llama(gemma_270m_gguf(), n_ctx=64, vocab_only=True, verbose=False)
    try:
        (token,) = llm.tokenize(text.encode(), add_bos=False, special=True)
        return token
    finally:
        llm.close()


@pytest.mark.slow
def test_off_loopback_the_server_refuses_to_start_without_a_key():
    result = subprocess.run([sys.executable, "-m", "runner.cli", "serve", str(tiny_gguf("llama")), "--host", "0.0.0.0",
                             "--port", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "TUNEBOOK_API_KEY"})
    assert result.returncode == 2
    assert "API key" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_off_loopback_requests_need_the_key():
    import tiny_gguf_models

    key = "s3cret-key"
    with running_api(ARTIFACTS / "api-key-server.log", tiny_gguf("llama"), "--api-key", key, host="0.0.0.0") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        status, answer = post(f"{url}/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}')
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        reply = client(url, key).chat.completions.create(
            model="m", temperature=0, messages=[{"role": "user", "content": tiny_gguf_models.QUESTION}])
        assert reply.choices[0].message.content == tiny_gguf_models.REPLY
