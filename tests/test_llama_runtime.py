"""llama.cpp as `make setup` builds it: the CPU kernels that fit this CPU, and never the AMX path.

The AMX crash itself (llama.cpp#20824, on AMX Xeons) cannot happen on a CPU without AMX: these tests check
what makes it impossible on one. The build: no installed CPU variant contains an AMX instruction, so none
can be loaded, whatever the CPU. The guard for other builds: told (by a stand-in for llama.cpp's feature
report and for /proc/cpuinfo, which is all that can be faked here) that the kernels have AMX and the CPU
runs it, models load without the extra weight buffers through which alone llama.cpp reaches its AMX code,
and batches of several tokens and several sequences still decode, on a real Q8_0 model.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from chat import llama_runtime
from chat.engine import ChatEngine, Sampling
from chat_support import TEST_THREADS, tiny_gguf

AMX_MNEMONICS = re.compile(r"\b(ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilezero|tilerelease|tdpb[su]{2}d|tdpbf16ps)\b")


def lib_dir() -> Path:
    from llama_cpp import llama_cpp as bindings

    return Path(bindings._base_path)


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())


@pytest.mark.slow
def test_no_installed_cpu_kernel_has_amx_code():
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to read the kernels"
    libraries = sorted(lib_dir().glob("libggml-cpu*.so"))
    assert libraries
    for library in libraries:
        code = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                              check=True).stdout
        assert not AMX_MNEMONICS.search(code), f"{library.name} has AMX instructions"
    variants = llama_runtime.built_variants()
    if variants:  # runtime dispatch: one library per x86 feature level
        assert llama_runtime.AMX_VARIANT not in variants
        assert {"haswell", "skylakex"} <= set(variants)


def test_the_loaded_kernels_use_what_this_cpu_has():
    info, flags = llama_runtime.system_info(), cpu_flags()
    print(f"variant {llama_runtime.cpu_variant()}: {info}")
    wanted = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16",
              "avx512vbmi": "AVX512_VBMI"}
    for flag, feature in wanted.items():
        if flag in flags:
            assert f"{feature} = 1" in info, f"the CPU has {flag}, the loaded kernels do not use it"
    assert "AMX_INT8 = 1" not in info


@pytest.fixture
def amx_cpu(monkeypatch):
    """What an AMX Xeon running a build with AMX kernels looks like to the guard."""
    real = llama_runtime.system_info()
    monkeypatch.setattr(llama_runtime, "system_info", lambda: real.rstrip(" |") + " | AMX_INT8 = 1 | ")
    monkeypatch.setattr(llama_runtime, "cpu_has_amx", lambda: True)


def test_guard_off_without_amx_on_both_sides(monkeypatch):
    monkeypatch.setattr(llama_runtime, "cpu_has_amx", lambda: True)
    assert not llama_runtime.amx_would_crash()  # these kernels have no AMX
    assert llama_runtime.model_params().use_extra_bufts


def test_guard_loads_models_without_extra_buffers(amx_cpu, caplog):
    with caplog.at_level(logging.WARNING, logger="tunebook.chat"):
        assert llama_runtime.amx_would_crash()
        assert llama_runtime.model_params().use_extra_bufts is False
    assert "llama.cpp#20824" in caplog.text


@pytest.mark.slow
def test_under_the_guard_batches_of_several_tokens_and_sequences_decode(amx_cpu):
    import tiny_gguf_models

    llm = llama_runtime.open_llama(tiny_gguf("llama"), n_ctx=128, n_batch=64, n_threads=TEST_THREADS, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts is False
        ids = llm.tokenize(tiny_gguf_models.QUESTION.encode(), add_bos=True)
        llm.eval(ids)  # one batch of len(ids) > 1 tokens
        assert llm.n_tokens == len(ids) > 1
    finally:
        llm.close()
    assert llama_runtime.load().llama_model_default_params().use_extra_bufts  # the defaults are given back

    engine = ChatEngine(tiny_gguf("llama"), n_ctx=128, n_threads=TEST_THREADS, parallel=2)
    try:
        question = [{"role": "user", "content": tiny_gguf_models.QUESTION}]
        prompt, greedy = engine.prepare(question, 24), Sampling(temperature=0.0, max_tokens=24)
        with engine.batcher._cv:  # both queued before the decode thread admits either
            generations = [engine.start(prompt, greedy) for _ in range(2)]
        assert [g.reply() for g in generations] == [tiny_gguf_models.REPLY] * 2
        assert engine.batcher.largest_batch == 2
    finally:
        engine.close()
