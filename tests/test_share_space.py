"""`tunebook space` run as a Space runs it: the folder built from a tiny finished run, a fresh virtual environment
made from nothing but its own requirements.txt, `python start.py` (the Dockerfile's command) started on
loopback, and one question answered over Chainlit's socket.io protocol, as a browser asks it. Docker itself
and the hub are not here: the image's steps are the same ones, run in a venv."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from importlib import metadata

import pytest
import yaml

from share_support import SYSTEM_PROMPT, free_port, stop_process, trained_run
from train_support import ROOT

pytestmark = pytest.mark.slow  # a venv of ~140 packages (pip's cache) and a real Chainlit server


async def ask(url: str, text: str, max_tokens: int = 16) -> str:
    """One question through the Chainlit protocol: connect (the server runs on_chat_start), send it greedy and
    short, collect the streamed reply until the task ends."""
    import socketio

    sio = socketio.AsyncClient(reconnection=False)
    events: asyncio.Queue = asyncio.Queue()
    for name in ("chat_settings", "stream_start", "stream_token", "task_end", "new_message"):
        sio.on(name, lambda data=None, name=name: events.put_nowait((name, data)))
    await sio.connect(url, socketio_path="/ws/socket.io", transports=["websocket"], wait_timeout=60,
                      auth={"sessionId": str(uuid.uuid4()), "clientType": "webapp", "threadId": "", "userEnv": "{}",
                            "chatProfile": ""})
    await sio.emit("connection_successful")
    while (await asyncio.wait_for(events.get(), 120))[0] != "chat_settings":
        pass
    await sio.emit("chat_settings_change", {"temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens})
    await sio.emit("client_message", {"message": {
        "id": str(uuid.uuid4()), "threadId": "", "name": "User", "type": "user_message", "output": text,
        "createdAt": datetime.now(timezone.utc).isoformat()}, "fileReferences": []})
    reply = ""
    while True:
        name, data = await asyncio.wait_for(events.get(), 180)
        if name == "stream_start":
            reply = data["output"]
        elif name == "stream_token":
            reply += data["token"]
        elif name == "new_message" and data.get("isError"):
            raise AssertionError(data["output"])
        elif name == "task_end" and reply:
            break
    await sio.disconnect()
    return reply


def test_the_space_builds_from_its_requirements_starts_and_answers(tmp_path):
    run = trained_run()
    space = tmp_path / "space"
    built = subprocess.run([sys.executable, "-m", "runner.cli", "space", str(run), "--out", str(space)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]

    readme = (space / "README.md").read_text()
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", readme, re.S)[1])
    assert meta["sdk"] == "docker" and meta["app_port"] == 7860
    assert 'CMD ["python", "start.py"]' in (space / "Dockerfile").read_text()
    pins = (space / "requirements.txt").read_text().splitlines()
    assert f"chainlit=={metadata.version('chainlit')}" in pins and all("==" in p for p in pins)
    assert (space / "model" / "tiny-vet-q8_0.gguf").read_bytes() == (run / "tiny-vet-q8_0.gguf").read_bytes()
    assert json.loads((space / "space.json").read_text())["system_prompt"] == SYSTEM_PROMPT
    assert (space / "chat" / "app.py").is_file() and (space / "chat" / "chainlit_home" / ".chainlit" / "config.toml").is_file()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["CMAKE_ARGS"] = "-DGGML_NATIVE=OFF"  # as the Dockerfile builds llama.cpp (pip's cache has the wheel)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-r", "requirements.txt"], cwd=space,
                               env=env, capture_output=True, text=True, timeout=1500)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    assert "torch" not in subprocess.run([str(venv / "bin" / "pip"), "list"], capture_output=True, text=True).stdout

    port = free_port()
    log = tmp_path / "space.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(venv / "bin" / "python"), "start.py"], cwd=space, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**env, "HOST": "127.0.0.1", "PORT": str(port), "TUNEBOOK_CHAT_THREADS": "1",
                                     "TUNEBOOK_CHAT_DEBUG_LOG": str(tmp_path / "seen.jsonl")})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        question = "My dog ate grapes. What should I do?"
        reply = asyncio.run(ask(url, question))
        print(f"the Space answered: {reply!r}")
        assert reply.strip()
        assert proc.poll() is None
    finally:
        stop_process(proc)
    assert "serving tiny-vet-q8_0.gguf" in log.read_text()
    # what the model saw: the run's own system prompt (from space.json), then the question
    seen = json.loads((tmp_path / "seen.jsonl").read_text().splitlines()[-1])["messages"]
    assert seen == [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
