"""llama.cpp as tunebook loads it: the CPU kernels that fit this CPU, never the AMX path that crashes.

`make setup` builds llama-cpp-python with runtime CPU dispatch (`GGML_BACKEND_DL`, `GGML_CPU_ALL_VARIANTS`):
one `libggml-cpu-<variant>.so` per x86 feature level (x64, haswell = AVX2, skylakex = AVX-512, icelake = + VNNI,
zen4 = + BF16), of which ggml loads the best one this CPU can run. The `sapphirerapids` variant, the only one
with AMX kernels, is not built (and deleted if a wheel has it): its AMX matrix multiply segfaults on AMX Xeons
for batches > 1 token (llama.cpp#20824, `ggml_backend_amx_mul_mat`); those Xeons run the zen4 kernels. ggml
looks for the variants next to the running executable and in the working directory, not in the Python
package, so every process loads them with `load()` before it creates a model. A build without dispatch (one
CPU backend linked in) works unchanged.

The guard at run time, for builds made elsewhere: when the CPU backend in use has AMX kernels and this
CPU runs them, models are loaded without llama.cpp's extra weight buffers (`use_extra_bufts = false`),
the only way its AMX code is reached; batches of any size then run on the AVX-512 kernels.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import re
from pathlib import Path

log = logging.getLogger("tunebook.chat")

AMX_VARIANT = "sapphirerapids"  # the one CPU variant built with AMX kernels (ggml/src/CMakeLists.txt)
AMX_WARNING = (
    "this llama.cpp build has AMX kernels, which crash on this CPU for batches > 1 token (llama.cpp#20824): "
    "loading models without extra weight buffers, so they never run. `make setup` builds one without them."
)


@functools.lru_cache(maxsize=None)
def load():
    """The `llama_cpp` module with its CPU backend loaded (the best variant for this CPU). Call before
    creating any llama.cpp model; safe to call many times."""
    import llama_cpp
    from llama_cpp import llama_cpp as bindings

    from .llama_log import route_llama_logs

    route_llama_logs()  # llama.cpp's own log lines only with TUNEBOOK_VERBOSE=1
    lib_dir = Path(bindings._base_path)
    # ggml's functions as libllama links them: a wheel holds libggml.so and libggml.so.0 as two copies, and
    # only the instance libllama uses (found through its own handle) counts.
    ggml = bindings._lib
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_reg_count() == 0:  # built with GGML_BACKEND_DL: nothing is registered yet
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(str(lib_dir).encode())
        if ggml.ggml_backend_reg_count() == 0:
            raise RuntimeError(f"llama.cpp found no CPU backend in {lib_dir}: reinstall it with `make setup`")
    llama_cpp.llama_backend_init()
    return llama_cpp


def system_info() -> str:
    """llama.cpp's own summary of the CPU features its loaded kernels use ("AVX512 = 1 | ...")."""
    return load().llama_print_system_info().decode("utf-8", "replace")


def cpu_variant() -> str | None:
    """The CPU variant this process loaded (e.g. "zen4"), or None for a build without runtime dispatch."""
    load()
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = re.findall(r"libggml-cpu-([A-Za-z0-9_.]+?)\.so", maps)
    return found[0] if found else None


def built_variants() -> list[str]:
    """The CPU variants installed beside llama.cpp (empty for a build without runtime dispatch)."""
    from llama_cpp import llama_cpp as bindings

    return sorted(p.name[len("libggml-cpu-"):-len(".so")] for p in Path(bindings._base_path).glob("libggml-cpu-*.so"))


def cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def kernels_have_amx() -> bool:
    return "AMX_INT8 = 1" in system_info()


def amx_would_crash() -> bool:
    """True when the loaded kernels would take the AMX path that crashes on this CPU."""
    return kernels_have_amx() and cpu_has_amx()


def model_params(**overrides):
    """llama.cpp model parameters for CPU inference, with the AMX guard applied."""
    llama_cpp = load()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    for key, value in overrides.items():
        setattr(params, key, value)
    if amx_would_crash():
        log.warning(AMX_WARNING)
        params.use_extra_bufts = False
    return params


def open_llama(model_path, **kwargs):
    """`llama_cpp.Llama(model_path, **kwargs)` on the loaded backend, with the AMX guard applied.

    `Llama` takes no model parameter for extra buffers, so under the guard its default parameters are
    given with `use_extra_bufts = false` while it loads."""
    llama_cpp = load()
    if not amx_would_crash():
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
    log.warning(AMX_WARNING)
    bindings = llama_cpp.llama_cpp
    defaults = bindings.llama_model_default_params

    def guarded():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = guarded
    try:
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
    finally:
        bindings.llama_model_default_params = defaults
