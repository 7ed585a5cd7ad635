"""Helpers for the sharing tests (tests/test_share_*.py): one tiny two-stage run, trained, exported to Q8_0,
checked and reported, made once per test process; a local MLflow tracking server; a reader of W&B's offline
run files."""
from __future__ import annotations

import atexit
import functools
import glob
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from train_support import chat_data, tiny_base, write_recipe

SYSTEM_PROMPT = "You are a careful assistant for pet owners."


@functools.lru_cache(maxsize=None)
def shared_run_folder() -> Path:
    """A folder holding recipe.yaml (two stages on a tiny Llama, a system prompt, Q8_0 export, targets) and,
    once `trained_run` ran, its run directory under runs/."""
    folder = Path(tempfile.mkdtemp(prefix="tunebook-share-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    base = tiny_base(folder)
    chat_data(folder / "general.jsonl", 48, "cats")
    chat_data(folder / "vet.jsonl", 32, "dogs")
    write_recipe(folder, f"""
        name: tiny-vet
        output_dir: {folder / 'runs'}
        seed: 7
        model: {{base: {base}, chat_template: llama-3, max_seq_length: 128, dtype: float32}}
        lora: {{r: 4, alpha: 8, target_modules: all-linear}}
        stages:
          - name: general
            data: {{source: general.jsonl, format: messages, val_size: 8}}
            train: {{max_steps: 6, learning_rate: 5e-3, micro_batch_size: 4, eval_steps: 2, logging_steps: 1}}
          - name: vet
            data: {{source: vet.jsonl, format: messages, val_size: 8, system_prompt: {SYSTEM_PROMPT}}}
            train: {{max_steps: 4, learning_rate: 5e-3, micro_batch_size: 4, eval_steps: 2, logging_steps: 1}}
        export: {{quantization: q8_0}}
        targets: {{first_stage_beats_base: true, stop_rate: 0.99}}
        """)
    return folder


@functools.lru_cache(maxsize=None)
def trained_run() -> Path:
    """The run directory of shared_run_folder()'s recipe, trained with the default report_to (TensorBoard)."""
    from runner.pipeline import train_recipe
    from runner.recipe import load_recipe
    from runner.run_dir import RunDir

    recipe = load_recipe(shared_run_folder() / "recipe.yaml")
    train_recipe(recipe, log=lambda m: None)
    return RunDir.of(recipe).path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path):
    """`mlflow server` on a free loopback port (SQLite store, artifacts served by the server); yields its URL."""
    port = free_port()
    log = open(folder / "mlflow-server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (folder / "mlflow-server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        stop_process(proc)
        log.close()


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (run-<id>.wandb): a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    records (7-byte header: crc, length, type full/first/middle/last) hold protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # padding to the end of the block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last piece of a split record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_runs(folder: Path) -> dict[str, dict]:
    """Every offline W&B run under `folder`: {display name: {"run": RunRecord, "history": [{key: value}],
    "summary": {key: value}, "artifacts": [ArtifactRecord]}}."""
    import json

    runs = {}
    for path in sorted(glob.glob(str(folder / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)):
        found = {"history": [], "summary": {}, "artifacts": []}
        for record in wandb_records(Path(path)):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["run"] = record.run
            elif kind == "history":
                found["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                         for i in record.history.item})
            elif kind == "summary":
                for item in record.summary.update:
                    found["summary"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
            elif kind == "artifact":
                found["artifacts"].append(record.artifact)
        runs[found["run"].display_name] = found
    return runs


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server the test started; kill it when it does not exit within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
