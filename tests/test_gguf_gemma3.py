"""GGUF export of a tiny Gemma 3 text model whose SentencePiece-style tokenizer was trained here."""
from __future__ import annotations

import dataclasses
import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from tiny_gguf_models import GEMMA_TEMPLATE, QUESTION, REPLY, build, chat_reply

import runner.export.gguf_writer as gguf_export
from runner.export.gguf_writer import GGUFExportError, write_gguf
from runner.export.gguf_verify import GGUFVerifyError, check_tensors, config_mismatches, llama_cpp_skip_reason, verify_gguf

QUANTS = ("f32", "f16", "q8_0")
SKIP_LLAMA_CPP = llama_cpp_skip_reason()
needs_llama_cpp = pytest.mark.skipif(SKIP_LLAMA_CPP is not None, reason=str(SKIP_LLAMA_CPP))
TT = gguf.TokenType


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build("gemma", tmp_path_factory.mktemp("gemma3") / "merged")


@pytest.fixture(scope="module")
def ggufs(model_dir):
    return {q: write_gguf(model_dir, model_dir.parent / f"tiny-gemma-{q}.gguf", q) for q in QUANTS}


@pytest.fixture(scope="module")
def verified(model_dir, ggufs):
    return {q: verify_gguf(model_dir, ggufs[q], q, n_threads=1, level="full") for q in QUANTS}


def test_transformers_reads_back_exactly_what_was_stored(verified):
    # f32: equal to the model (norms +1 on write, -1 on read); f16/q8_0: equal to the rounded model
    for quant in QUANTS:
        assert verified[quant]["transformers"]["max_abs_diff"] == 0.0, (quant, verified[quant])
        assert verified[quant]["config_mismatches"] == {}


@needs_llama_cpp
def test_llama_cpp_logits_match_the_model(verified):
    # 256 probe tokens, 16-token sliding window: the window and the global layer both matter
    assert verified["f32"]["n_tokens"] >= 200
    assert verified["f16"]["llama.cpp"]["max_abs_diff"] < 0.01
    assert verified["q8_0"]["llama.cpp"]["argmax_agreement"] >= 0.99
    assert all(verified[q]["llama.cpp"]["tokenizer_match"] for q in QUANTS)


def test_file_holds_sentencepiece_vocab_and_gemma_layout(model_dir, ggufs):
    reader = gguf.GGUFReader(ggufs["q8_0"])
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens, types, scores = (field(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "scores"))
    assert field("general.architecture") == "gemma3"
    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.add_space_prefix") is False
    assert tokens[field("tokenizer.ggml.eot_token_id")] == "<end_of_turn>"
    assert tokens[field("tokenizer.ggml.bos_token_id")] == "<bos>" and field("tokenizer.ggml.add_bos_token")
    assert types[tokens.index("<start_of_turn>")] == TT.CONTROL and types[tokens.index("<0x41>")] == TT.BYTE
    merged = [s for t, s, k in zip(tokens, scores, types) if k == TT.NORMAL and len(t) > 1]
    assert merged and max(merged) <= 0.0  # minus the merge rank: earlier merges win in llama.cpp
    assert field("tokenizer.chat_template") == GEMMA_TEMPLATE
    assert field("gemma3.attention.sliding_window") == 16
    assert field("gemma3.attention.sliding_window_pattern") == [True] * 5 + [False]
    assert field("gemma3.rope.freq_base") == 1_000_000.0 and field("gemma3.rope.freq_base_swa") == 10_000.0
    assert field("gemma3.rope.scaling.type") == "linear" and field("gemma3.rope.scaling.factor") == 8.0
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied to token_embd


def test_norms_are_stored_plus_one(model_dir, ggufs):
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(ggufs["f32"]).tensors}
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        for hf_name, name in [("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                              ("model.layers.5.self_attn.q_norm.weight", "blk.5.attn_q_norm.weight"),
                              ("model.norm.weight", "output_norm.weight")]:
            np.testing.assert_array_equal(stored[name], f.get_tensor(hf_name).numpy() + 1)


def test_every_tensor_holds_the_model_weight_as_stored(verified):
    for quant in QUANTS:
        assert verified[quant]["tensors"]["ok"], (quant, verified[quant]["tensors"])


def test_verification_catches_norms_stored_without_the_plus_one(model_dir, tmp_path, monkeypatch):
    broken = dataclasses.replace(gguf_export.ARCHS["Gemma3ForCausalLM"], norm_shift=0.0)
    monkeypatch.setitem(gguf_export.ARCHS, "Gemma3ForCausalLM", broken)
    path = write_gguf(model_dir, tmp_path / "unshifted.gguf", "q8_0")
    monkeypatch.undo()
    found = check_tensors(model_dir, path, "q8_0")
    assert "blk.0.attn_norm.weight" in found["mismatches"] and "output_norm.weight" in found["mismatches"]
    assert all(name.endswith("norm.weight") for name in found["mismatches"])
    assert found["mismatches"]["output_norm.weight"] == "max |stored - (weight + 1)| 1"
    with pytest.raises(GGUFVerifyError, match="tensor blk.0.attn_norm.weight"):
        verify_gguf(model_dir, path, "q8_0", n_threads=1)


@needs_llama_cpp
def test_chat_uses_the_embedded_template_and_stops_at_end_of_turn(ggufs):
    reply = chat_reply(ggufs["q8_0"], QUESTION)
    assert reply["chat_format"] == "chat_template.default"
    assert reply["content"] == REPLY
    assert reply["finish_reason"] == "stop"  # at <end_of_turn>, which is not the tokenizer's eos


def test_query_scale_llama_cpp_cannot_express_is_refused(model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"query_pre_attn_scalar": 64}))
    with pytest.raises(GGUFExportError, match="(?s)query_pre_attn_scalar=64.*fix: set query_pre_attn_scalar=32"):
        write_gguf(other, tmp_path / "x.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_metadata_that_disagrees_with_config_json_is_reported(model_dir, ggufs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"sliding_window": 32}))
    assert config_mismatches(other, ggufs["f32"]) == {"sliding_window": "GGUF says 16, config.json says 32"}
