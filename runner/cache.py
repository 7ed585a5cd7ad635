"""Where tunebook keeps what it makes once and reuses across runs: converted base models, tokenizers read
from GGUF files, tokenized datasets. `$TUNEBOOK_CACHE`, default ~/.cache/tunebook."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("TUNEBOOK_CACHE", Path.home() / ".cache" / "tunebook"))
