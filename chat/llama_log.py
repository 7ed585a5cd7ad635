"""llama.cpp's own log lines (model loading, "llama_kv_cache_iswa: using full-size SWA cache", ...) stay off
the console unless TUNEBOOK_VERBOSE=1 (`tunebook --verbose`).

llama-cpp-python's `verbose=False` is not enough: its log callback maps ggml's log levels with an older
table (ggml's WARN reads as ERROR there), so some lines still print. One process-wide callback decides
instead; it must be installed after `import llama_cpp`, which installs llama-cpp-python's own.
"""
from __future__ import annotations

import ctypes
import os
import sys

_installed = None  # the ctypes callback: kept alive for as long as llama.cpp may call it


def route_llama_logs() -> None:
    """Install the callback once per process: llama.cpp's lines go to stderr only when TUNEBOOK_VERBOSE=1."""
    global _installed
    if _installed is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _log(level, text, user_data):
        if os.environ.get("TUNEBOOK_VERBOSE") == "1":
            sys.stderr.write(text.decode("utf-8", "replace"))
            sys.stderr.flush()

    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    _installed = _log
