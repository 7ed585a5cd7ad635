"""Many chat sessions at once against the real server, over Chainlit's socket.io protocol.

A client does what the browser does: connect to /ws/socket.io with {sessionId, clientType, ...} as
auth, emit `connection_successful` (the server then runs on_chat_start), emit `client_message`
with a step dict per question, and read `stream_start`/`stream_token`/`new_message` until
`task_end`. A reply first shows a status (read, or place in line), which the reply's first words replace
(`isSequence`). The server records what each generation saw and how many replies the model had in hand
($TUNEBOOK_CHAT_DEBUG_LOG), so the test can check every session's history holds its own turns only and that
replies were decoded together.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone

import pytest
import socketio

from chat.serve import ENV_DEBUG_LOG, ENV_MAX_TOKENS, ENV_PARALLEL
from chat_support import ARTIFACTS, running_server, tiny_gguf

STATUS = ("_Reading your message", "_⏳ ")  # chat/app.py READING, STATUS_PREFIX

SESSIONS, QUESTIONS = 10, 3


class ChatClient:
    """One browser tab's worth of Chainlit socket protocol."""

    EVENTS = ("stream_start", "stream_token", "new_message", "update_message", "task_start", "task_end", "chat_settings")

    def __init__(self, url: str):
        self.url = url
        self.session_id = str(uuid.uuid4())
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: asyncio.Queue = asyncio.Queue()
        for name in self.EVENTS:
            self.sio.on(name, self._recorder(name))

    def _recorder(self, name):
        async def record(data=None):
            await self.events.put((name, data, time.monotonic()))

        return record

    async def connect(self):
        await self.sio.connect(
            self.url,
            socketio_path="/ws/socket.io",
            transports=["websocket"],
            auth={"sessionId": self.session_id, "clientType": "webapp", "threadId": "", "userEnv": "{}", "chatProfile": ""},
            wait_timeout=30,
        )
        await self.sio.emit("connection_successful")
        await self.next_event("chat_settings")  # on_chat_start has run

    async def next_event(self, wanted: str, timeout: float = 120):
        while True:
            name, data, at = await asyncio.wait_for(self.events.get(), timeout)
            if name == wanted:
                return data

    async def ask(self, text: str, timeout: float = 120, on_first_token=None) -> dict:
        """Send a question; collect events until the task ends. Returns the reply and any errors."""
        sent = time.monotonic()
        await self.sio.emit("client_message", {
            "message": {
                "id": str(uuid.uuid4()), "threadId": "", "name": "User", "type": "user_message",
                "output": text, "createdAt": datetime.now(timezone.utc).isoformat(),
            },
            "fileReferences": [],
        })
        streamed: dict[str, str] = {}
        final: dict[str, str] = {}
        errors, first_token_at, status_at, started, fired = [], None, None, False, False

        def showing(message_id: str, text: str, at: float) -> None:
            nonlocal first_token_at, status_at
            streamed[message_id] = text
            if text.startswith(STATUS):
                status_at = status_at or at
            elif text and first_token_at is None:
                first_token_at = at

        while True:
            name, data, at = await asyncio.wait_for(self.events.get(), timeout)
            if name == "task_start":
                started = True
            elif name == "stream_start":
                showing(data["id"], data["output"], at)
            elif name == "stream_token":
                text = data["token"] if data.get("isSequence") else streamed.get(data["id"], "") + data["token"]
                showing(data["id"], text, at)
            if on_first_token and first_token_at is not None and not fired:
                fired = True
                await on_first_token()
            elif name in ("new_message", "update_message") and data.get("type") == "assistant_message":
                if data.get("isError"):
                    errors.append(data["output"])
                else:
                    final[data["id"]] = data["output"]
            elif name == "task_end" and started:
                break
        reply_id = next(iter(streamed), None)
        return {
            "streamed": streamed.get(reply_id, ""),
            "final": final.get(reply_id, ""),
            "others": [v for k, v in final.items() if k != reply_id],
            "errors": errors,
            "status_s": None if status_at is None else status_at - sent,
            "first_token_s": None if first_token_at is None else first_token_at - sent,
        }

    async def change_settings(self, **settings):
        await self.sio.emit("chat_settings_change", settings)

    async def close(self):
        await self.sio.disconnect()


def question(marker: str, i: int) -> str:
    topics = ["My dog drinks a lot of water", "Now he also sleeps more than usual", "Should I change his food"]
    return f"[{marker}] {topics[i]}. What do you think, for {marker}?"


async def one_session(url: str, marker: str) -> dict:
    client = ChatClient(url)
    await client.connect()
    await client.change_settings(temperature=0.0, top_p=1.0, max_tokens=16)  # greedy: never an empty reply
    try:
        answers = [await client.ask(question(marker, i)) for i in range(QUESTIONS)]
    finally:
        await client.close()
    return {"session": client.session_id, "marker": marker, "answers": answers}


@pytest.mark.slow
def test_ten_sessions_three_messages_each(tmp_path):
    """On a tiny exported model (embedded Llama 3 template): the test is about the server, not speed."""
    seen_log = tmp_path / "seen.jsonl"
    env = {ENV_MAX_TOKENS: "16", ENV_DEBUG_LOG: str(seen_log), ENV_PARALLEL: "4"}
    with running_server(ARTIFACTS / "chat-concurrency-server.log", tiny_gguf("llama"), env) as (url, proc):
        started = time.monotonic()

        async def everyone():
            return await asyncio.gather(*(one_session(url, f"S{n:02d}") for n in range(SESSIONS)))

        results = asyncio.run(everyone())
        wall = time.monotonic() - started
        assert proc.poll() is None, "the server died"

    answers = [a for r in results for a in r["answers"]]
    assert len(answers) == SESSIONS * QUESTIONS
    assert [a["errors"] for a in answers if a["errors"]] == []
    assert all(a["streamed"].strip() and a["final"] == a["streamed"] for a in answers)

    # What the model saw: per session, 3 generations whose user turns all carry that session's
    # marker, one more each time, with that session's own earlier replies in between.
    # Every reply showed a status before its first words.
    assert all(a["status_s"] is not None and a["status_s"] <= a["first_token_s"] for a in answers)
    seen, in_hand = defaultdict(list), []
    for line in seen_log.read_text().splitlines():
        record = json.loads(line)
        seen[record["session"]].append(record["messages"])
        in_hand.append((record["decoding"], record["waiting"]))
    assert max(d for d, _ in in_hand) >= 2, "replies were never decoded together"
    assert max(w for _, w in in_hand) >= 1  # more sessions than sequences: some waited in line
    assert len(seen) == SESSIONS
    for r in results:
        generations = seen[r["session"]]
        assert len(generations) == QUESTIONS
        for k, messages in enumerate(generations):
            users = [m["content"] for m in messages if m["role"] == "user"]
            replies = [m["content"] for m in messages if m["role"] == "assistant"]
            assert users == [question(r["marker"], i) for i in range(k + 1)]
            assert replies == [a["final"] for a in r["answers"][:k]]
    firsts = sorted(a["first_token_s"] for a in answers)
    statuses = sorted(a["status_s"] for a in answers)
    print(f"{len(answers)} replies in {wall:.1f} s; status shown after median {statuses[len(statuses) // 2]:.2f} s, "
          f"max {statuses[-1]:.2f} s; first token median {firsts[len(firsts) // 2]:.2f} s, max {firsts[-1]:.2f} s")


@pytest.mark.slow
def test_stop_button_stops_generation_and_the_session_goes_on(tmp_path):
    """On Gemma 3 270M: a 1024-token reply takes long enough to be stopped midway."""
    seen_log = tmp_path / "seen.jsonl"
    with running_server(ARTIFACTS / "chat-stop-server.log", env={ENV_DEBUG_LOG: str(seen_log)}) as (url, _proc):

        async def scenario():
            client = ChatClient(url)
            await client.connect()
            await client.change_settings(temperature=0.7, top_p=0.9, max_tokens=1024)
            stopped_at = {}

            async def press_stop():
                stopped_at["t"] = time.monotonic()
                await client.sio.emit("stop")

            long = await client.ask("Tell me everything about caring for an old dog, in detail.", on_first_token=press_stop)
            stop_s = time.monotonic() - stopped_at["t"]
            await client.change_settings(temperature=0.7, top_p=0.9, max_tokens=16)
            after = await client.ask("Thanks. Is walking good for him?")
            await client.close()
            return long, after, stop_s

        long, after, stop_s = asyncio.run(scenario())

    print(f"generation ended {stop_s:.2f} s after the stop button")
    assert "Task manually stopped." in long["others"]
    assert stop_s < 5, f"generation went on for {stop_s:.1f} s after the stop button"
    assert after["streamed"].strip() and not after["errors"]
    # Had the stopped generation gone on (up to 1024 tokens) it would hold the model this long.
    assert after["first_token_s"] < 8, f"the next reply waited {after['first_token_s']:.1f} s"
    # The stopped reply stays in the history, cut where it stopped.
    second = [json.loads(line)["messages"] for line in seen_log.read_text().splitlines()][-1]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert len(second[2]["content"]) < 2000
