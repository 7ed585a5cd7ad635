"""On-disk cache of tokenized stages, keyed by everything that changes the tokens.

The key hashes the source fingerprint (files' paths, sizes and modification times, or the hub
dataset's fingerprint), the stage's data settings, the seed, max_seq_length, the template text and
the tokenizer (its full serialized form). Entries are plain arrays (.npz, loaded without pickle) plus
the stage's report as JSON, written to a temporary folder and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

CACHE_VERSION = 1  # bump when the pipeline's output for the same inputs changes


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                        sorted(map(str, tokenizer.all_special_tokens))])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _flat(examples: list[dict], name: str) -> dict[str, np.ndarray]:
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    ids = [np.asarray(e["input_ids"], dtype=np.int64) for e in examples]
    labels = [np.asarray(e["labels"], dtype=np.int64) for e in examples]
    empty = np.zeros(0, dtype=np.int64)
    return {f"{name}_lengths": lengths,
            f"{name}_ids": np.concatenate(ids) if ids else empty,
            f"{name}_labels": np.concatenate(labels) if labels else empty}


def _unflat(arrays, name: str) -> list[dict]:
    ends = np.cumsum(arrays[f"{name}_lengths"]).tolist()
    ids, labels = arrays[f"{name}_ids"].tolist(), arrays[f"{name}_labels"].tolist()
    out, start = [], 0
    for end in ends:
        out.append({"input_ids": ids[start:end], "labels": labels[start:end]})
        start = end
    return out


def load(cache_dir: Path, key: str) -> tuple[list[dict], list[dict], dict] | None:
    entry = cache_dir / key
    try:
        with np.load(entry / "tokens.npz", allow_pickle=False) as arrays:
            train, val = _unflat(arrays, "train"), _unflat(arrays, "val")
        report = json.loads((entry / "report.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    return train, val, report


def save(cache_dir: Path, key: str, train: list[dict], val: list[dict], report: dict) -> Path:
    entry = cache_dir / key
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(tmp / "tokens.npz", **_flat(train, "train"), **_flat(val, "val"))
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    if entry.exists() and load(cache_dir, key) is None:
        shutil.rmtree(entry, ignore_errors=True)  # an unreadable entry (older format): replace it
    try:
        os.rename(tmp, entry)
    except OSError:  # another process wrote the same entry first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return entry
