"""llama.cpp's own quantizer, through llama-cpp-python (which set-up already builds): the K-quants and the other
llama.cpp types, made from the writer's full-precision GGUF of the merged model. No llama.cpp checkout and
no compiler step beyond set-up.

llama.cpp chooses each tensor's type itself (Q4_K_M keeps some tensors at Q6_K; a row its blocks cannot
divide falls back to Q5_0, Q8_0, ...): `quantize_gguf` asks for the file type and the kept tensors only. The
same library's row quantizer (`ggml_quantize_rows`) lets verification recompute every tensor byte for byte.
"""
from __future__ import annotations

import ctypes
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from ..errors import GGUFExportError
from ..recipe import LLAMA_CPP_QUANTS

# every llama.cpp type a recipe may name (export.quantization) -> llama.cpp's file type
_FTYPES = {
    "q6_k": FT.MOSTLY_Q6_K, "q5_k_m": FT.MOSTLY_Q5_K_M, "q5_k_s": FT.MOSTLY_Q5_K_S, "q4_k_m": FT.MOSTLY_Q4_K_M,
    "q4_k_s": FT.MOSTLY_Q4_K_S, "q3_k_m": FT.MOSTLY_Q3_K_M, "q5_0": FT.MOSTLY_Q5_0, "q4_0": FT.MOSTLY_Q4_0,
    "iq4_xs": FT.MOSTLY_IQ4_XS, "iq4_nl": FT.MOSTLY_IQ4_NL,
}
FTYPES = {name: _FTYPES[name] for name in LLAMA_CPP_QUANTS}
EMBEDDING, OUTPUT = "token_embd.weight", "output.weight"


def quantize_gguf(source: Path, out: Path, quant: str, kept: dict[str, QT] | None = None,
                  n_threads: int | None = None, log=print) -> Path:
    """Quantize the GGUF `source` (F32/BF16/F16 weights) to `quant` at `out`; `kept`: GGUF tensor name ->
    type for the embedding / output head (runner/export/gguf_writer.py `kept_types`). The file appears under
    its name only when llama.cpp has finished it."""
    from chat.llama_runtime import load

    llama_cpp = load()  # the CPU backend this machine runs (a build with runtime dispatch has none before)
    if quant not in FTYPES:
        raise GGUFExportError(f"{quant!r} is not a llama.cpp type tunebook makes", f"use one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FTYPES[quant])
    params.nthread = n_threads or _threads()
    kept = kept or {}
    if EMBEDDING in kept:
        params.token_embedding_type = int(kept[EMBEDDING])
        if OUTPUT not in kept:  # a tied head is token_embd.weight: llama.cpp types it as the output
            params.output_tensor_type = int(kept[EMBEDDING])
    if OUTPUT in kept:
        params.output_tensor_type = int(kept[OUTPUT])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    log(f"llama.cpp quantizes {source.name} to {quant} ({params.nthread} threads)")
    try:
        with _llama_cpp_log(log) as messages:
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0 or not tmp.is_file():
            said = "".join(messages).strip().splitlines()[-5:]
            raise GGUFExportError(f"llama.cpp's quantizer could not make {quant} from {source} (status {status})"
                                  + "".join(f"\n    llama.cpp: {line}" for line in said),
                                  "check that the source GGUF is complete and the type needs no importance matrix")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"quantized to {quant} in {time.perf_counter() - start:.1f} s: {out.stat().st_size / 2**20:.0f} MiB")
    return out


_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


@contextmanager
def _llama_cpp_log(log):
    """llama.cpp's log while it quantizes: kept (for an error message), not printed; a progress line at every
    quarter of the tensors. llama-cpp-python's own log handler is put back afterwards."""
    import llama_cpp

    messages: list[str] = []
    shown = [0]

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        line = text.decode("utf-8", "replace")
        messages.append(line)
        match = _TENSOR_LINE.match(line)
        if match:
            done, total = int(match.group(1)), int(match.group(2))
            if done * 4 // total > shown[0] and done < total:
                shown[0] = done * 4 // total
                log(f"  quantized {done}/{total} tensors")

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield messages
    finally:  # back to the process's own handler (chat/llama_log.py), else llama-cpp-python's
        from llama_cpp import _logger

        from chat import llama_log

        llama_cpp.llama_log_set(llama_log._installed or _logger.llama_log_callback, ctypes.c_void_p(0))


# --- llama.cpp's row quantizer, for verification ------------------------------------------------------

_GGML = None


def _ggml():
    """ggml's base library as llama-cpp-python ships it (its quantizers live there)."""
    global _GGML
    if _GGML is None:
        import llama_cpp

        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        found = [p for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll") for p in lib_dir.glob(name)]
        if not found:
            raise GGUFExportError(f"no ggml base library in {lib_dir}",
                                  "reinstall llama-cpp-python (make setup)")
        lib = ctypes.CDLL(str(found[0]))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        _GGML = lib
    return _GGML


def ggml_quantize_rows(rows: np.ndarray, qtype: QT) -> np.ndarray:
    """`rows` (2-D float32) as llama.cpp's quantizer stores them in `qtype` (no importance matrix): bytes, a row
    of them per row."""
    lib = _ggml()
    rows = np.ascontiguousarray(rows, dtype=np.float32).reshape(rows.shape[0], -1)
    n_rows, n_per_row = rows.shape
    if n_per_row % GGML_QUANT_SIZES[qtype][0]:  # ggml would abort the process
        raise GGUFExportError(f"rows of {n_per_row} values cannot be stored as {qtype.name}",
                              f"its blocks hold {GGML_QUANT_SIZES[qtype][0]} values")
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise GGUFExportError(f"{qtype.name} needs an importance matrix", "use a type that does not (q4_k_m, iq4_xs, ...)")
    out = np.empty(lib.ggml_row_size(int(qtype), n_per_row) * n_rows, dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    if written != out.size:
        raise GGUFExportError(f"llama.cpp's {qtype.name} quantizer wrote {written} bytes, expected {out.size}",
                              "report this with the llama-cpp-python version")
    return out.reshape(n_rows, -1)


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
