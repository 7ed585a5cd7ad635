"""Who trains a stage, by the recipe's `backend:`; the pipeline only orders stages and hands each to it.

- hf (default): transformers + peft + trl in this environment (hf.py);
- axolotl: each stage becomes an axolotl config, run as `axolotl train` in `.venv-axolotl` (axolotl.py);
- unsloth: FastLanguageModel in `.venv-unsloth`; it needs a GPU unless the recipe sets
  `allow_cpu_fallback: true` (unsloth.py).
"""
from __future__ import annotations

from ..errors import TunebookError
from .protocol import Backend

BACKENDS = ("hf", "axolotl", "unsloth")


def get_backend(name: str) -> Backend:
    """The backend called `name`."""
    if name == "hf":
        from .hf import BACKEND
    elif name == "axolotl":
        from .axolotl import BACKEND
    elif name == "unsloth":
        from .unsloth import BACKEND
    else:
        raise TunebookError(f"unknown backend '{name}'\n    fix: use one of {', '.join(BACKENDS)}")
    return BACKEND
