"""The base model's gate, kept once per machine: every run of a recipe (and every recipe on the same base, set,
system prompt and answering settings) measures the same base model the same way, ~5 minutes each time for
the quickstart. Kept in $TUNEBOOK_CACHE/gate/, keyed by everything the answers depend on: the gate's inputs
as the run records them, what the base model is (a package's version or a local folder's files), and the
llama.cpp that answered (its version and the CPU kernels it loaded: batched sums differ between kernels).

A base named by a hub id is never kept: its revision can change under the same name. `read` and `keep` also serve
the run's own kept gate parts (runs/<name>/gate/kept/, runner/measure/gate.py)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import atomic
from ..cache import cache_root
from ..model.package import PREFIX, package_version
from ..recipe import Recipe
from ..run_dir import file_identity


def base_identity(recipe: Recipe) -> str | None:
    """What the base model is, for the key; None when it cannot be told (a hub id)."""
    spec = recipe.model.base
    if spec.startswith(PREFIX):
        return f"{spec}=={package_version(spec[len(PREFIX):])}"
    local = recipe.local_path(spec)
    return f"{local}:{file_identity(local)}" if local is not None else None


def answering_identity() -> str:
    """The llama.cpp that answers: its version and its CPU kernels."""
    import llama_cpp

    from chat.llama_runtime import cpu_variant
    return f"llama_cpp=={llama_cpp.__version__}:{cpu_variant() or 'builtin'}"


def cache_file(recipe: Recipe, inputs: dict) -> Path | None:
    """Where the base gate for these inputs is kept; None when it must not be kept."""
    base = base_identity(recipe)
    if base is None:
        return None
    key = json.dumps({"inputs": inputs, "base": base, "llama": answering_identity()}, sort_keys=True, default=str)
    return cache_root() / "gate" / f"base-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def read(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged entry is made again


def keep(path: Path | None, result: dict) -> None:
    if path is not None:
        atomic.write_text(path, json.dumps(result, indent=2) + "\n")
