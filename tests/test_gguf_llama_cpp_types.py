"""llama.cpp's own quantizer (through llama-cpp-python) makes the K-quants and the other llama.cpp types from the
writer's full-precision GGUF; each file loads in llama.cpp, holds exactly what llama.cpp's quantizer makes of
the model's weights, and agrees with the model within its type's tolerance. A damaged file is refused."""
from __future__ import annotations

import shutil

import pytest
from tiny_gguf_models import build

from chat.engine import ChatError, check_gguf
from runner.export.gguf_table import GGUFFileError, read_table
from runner.export.gguf_verify import THRESHOLDS, GGUFVerifyError, check_tensors, verify_gguf
from runner.export.gguf_writer import GGUFExportError, kept_types, write_gguf
from runner.export.llama_quant import quantize_gguf

TYPES = ("q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny Llama with rows the K-quants' 256-value blocks divide, and its F32 GGUF."""
    model_dir = build("llama", tmp_path_factory.mktemp("wide") / "merged", hidden_size=256, intermediate_size=512)
    return model_dir, write_gguf(model_dir, model_dir.parent / "wide-f32.gguf", "f32")


@pytest.fixture(scope="module")
def quantized(wide_llama):
    model_dir, source = wide_llama
    return {q: quantize_gguf(source, model_dir.parent / f"wide-{q}.gguf", q, n_threads=1, log=lambda m: None)
            for q in TYPES}


@pytest.fixture(scope="module")
def verified(wide_llama, quantized):
    model_dir, _ = wide_llama
    return {q: verify_gguf(model_dir, quantized[q], q, n_threads=1) for q in TYPES}


def test_each_llama_cpp_type_is_what_llama_cpp_makes_of_the_weights(verified):
    for quant, report in verified.items():
        assert report["tensors"]["ok"] and report["tensors"]["mismatches"] == {}, quant
        assert report["config_mismatches"] == {}


def test_the_files_hold_llama_cpps_own_mixtures(verified):
    counts = {q: verified[q]["tensors"]["type_counts"] for q in TYPES}
    assert set(counts["q6_k"]) == {"F32", "Q6_K"}
    assert counts["q4_k_m"]["Q4_K"] > 0 and counts["q4_k_m"]["Q6_K"] > 0  # Q4_K_M keeps some tensors at Q6_K
    assert counts["q5_k_m"]["Q5_K"] > 0
    assert counts["q4_0"]["Q4_0"] > 0
    assert counts["iq4_xs"]["IQ4_XS"] > 0  # no importance matrix needed


def test_each_loads_in_llama_cpp_and_agrees_within_its_tolerance(verified):
    for quant in TYPES:
        row = verified[quant]["llama.cpp"]
        assert row["ok"] and row["tokenizer_match"], (quant, row)
        assert row["argmax_agreement"] >= THRESHOLDS["llama.cpp"][quant][1]
    # fewer bits, further from the model
    assert verified["q6_k"]["llama.cpp"]["mean_abs_diff"] < verified["q4_k_m"]["llama.cpp"]["mean_abs_diff"]


def test_full_level_reads_a_k_quant_back_with_transformers(wide_llama, quantized):
    model_dir, _ = wide_llama
    report = verify_gguf(model_dir, quantized["q4_k_m"], "q4_k_m", n_threads=1, level="full")
    assert report["transformers"]["max_abs_diff"] == 0.0  # transformers' dequantization = the file's numbers


def test_embedding_and_output_kept_at_higher_precision(wide_llama, tmp_path):
    model_dir, source = wide_llama
    keep = {"embedding": "f16", "output": "q8_0"}
    kept = kept_types([t.name for t in read_table(source)[1]], keep)
    out = quantize_gguf(source, tmp_path / "kept-q4_k_m.gguf", "q4_k_m", kept, n_threads=1, log=lambda m: None)
    types = {t.name: t.qtype.name for t in read_table(out)[1]}
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "Q8_0"
    assert verify_gguf(model_dir, out, "q4_k_m", n_threads=1, keep=keep)["tensors"]["ok"]
    # asked for other types than the file has: the exact check says so
    wrong = check_tensors(model_dir, out, "q4_k_m", keep={"embedding": "bf16"})
    assert "stored as F16" in wrong["mismatches"]["token_embd.weight"]
    # the writer's types keep tensors too
    q8 = write_gguf(model_dir, tmp_path / "kept-q8_0.gguf", "q8_0", keep={"output": "f32"})
    assert {t.name: t.qtype.name for t in read_table(q8)[1]}["output.weight"] == "F32"
    assert verify_gguf(model_dir, q8, "q8_0", n_threads=1, keep={"output": "f32"})["tensors"]["ok"]


def test_a_tied_head_is_the_embedding(tmp_path):
    model_dir = build("gemma", tmp_path / "gemma")
    source = write_gguf(model_dir, tmp_path / "gemma-f32.gguf", "f32")
    names = [t.name for t in read_table(source)[1]]
    assert "output.weight" not in names
    assert kept_types(names, {"output": "bf16"}) == kept_types(names, {"embedding": "bf16"})
    with pytest.raises(GGUFExportError, match="tied"):
        kept_types(names, {"embedding": "f16", "output": "q8_0"})
    keep = {"output": "f16"}
    out = quantize_gguf(source, tmp_path / "gemma-q4_k_m.gguf", "q4_k_m", kept_types(names, keep), n_threads=1,
                        log=lambda m: None)
    assert {t.name: t.qtype.name for t in read_table(out)[1]}["token_embd.weight"] == "F16"
    assert verify_gguf(model_dir, out, "q4_k_m", n_threads=1, keep=keep)["llama.cpp"]["ok"]


def test_a_corrupt_or_truncated_gguf_is_refused_clearly(wide_llama, quantized, tmp_path):
    model_dir, _ = wide_llama
    good = quantized["q4_k_m"]
    table = {t.name: t for t in read_table(good)[1]}

    corrupt = tmp_path / "corrupt.gguf"
    shutil.copy(good, corrupt)
    target = table["blk.1.ffn_down.weight"]
    with open(corrupt, "r+b") as f:
        f.seek(target.offset + target.nbytes // 2)
        f.write(bytes(64))
    with pytest.raises(GGUFVerifyError, match="blk.1.ffn_down.weight"):
        verify_gguf(model_dir, corrupt, "q4_k_m", n_threads=1)

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 1000])
    with pytest.raises(GGUFFileError, match="(?s)ends inside tensor .*export it again"):
        verify_gguf(model_dir, truncated, "q4_k_m", n_threads=1)

    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good.read_bytes()[:200])
    with pytest.raises(GGUFFileError, match="header cannot be read"):
        read_table(header_only)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFFileError, match="not a GGUF file"):
        read_table(not_gguf)
    with pytest.raises(ChatError, match="not a GGUF file"):  # the chat refuses it too, before llama.cpp
        check_gguf(not_gguf)
