"""GGUF export of a tiny Llama 3.1-style model whose byte-level BPE tokenizer was trained here."""
from __future__ import annotations

import dataclasses
import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from tiny_gguf_models import LLAMA3_TEMPLATE, QUESTION, REPLY, build, chat_reply

import runner.export.gguf_writer as gguf_export
from runner.export.gguf_writer import GGUFExportError, permute_qk, write_gguf
from runner.export.gguf_verify import LEVELS, GGUFVerifyError, check_tensors, llama_cpp_skip_reason, verify_gguf

QUANTS = ("f32", "f16", "q8_0")
SKIP_LLAMA_CPP = llama_cpp_skip_reason()
needs_llama_cpp = pytest.mark.skipif(SKIP_LLAMA_CPP is not None, reason=str(SKIP_LLAMA_CPP))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("llama") / "merged")


@pytest.fixture(scope="module")
def ggufs(model_dir):
    meta = {"name": "tiny-vet", "base_model": "tests/tiny-llama", "recipe": "tiny-vet-recipe"}
    return {q: write_gguf(model_dir, model_dir.parent / f"tiny-vet-{q}.gguf", q, metadata=meta) for q in QUANTS}


@pytest.fixture(scope="module")
def verified(model_dir, ggufs):
    return {q: verify_gguf(model_dir, ggufs[q], q, n_threads=1, level="full") for q in QUANTS}


def test_transformers_reads_back_exactly_what_was_stored(verified):
    # f32: equal to the model; f16/q8_0: equal to the model with its weights rounded the same way
    for quant in QUANTS:
        row = verified[quant]["transformers"]
        assert row["max_abs_diff"] == 0.0, (quant, row)
        assert verified[quant]["config_mismatches"] == {}


def test_every_tensor_holds_the_model_weight_as_stored(model_dir, ggufs, verified):
    for quant in QUANTS:
        row = verified[quant]["tensors"]
        assert row["ok"] and row["mismatches"] == {}, (quant, row)
        reader = gguf.GGUFReader(ggufs[quant])
        assert row["n_tensors"] == len(reader.tensors)
        assert row["n_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)


@needs_llama_cpp
def test_llama_cpp_logits_match_the_model(verified):
    assert verified["f32"]["n_tokens"] >= 200
    assert verified["f16"]["llama.cpp"]["max_abs_diff"] < 0.01
    assert verified["q8_0"]["llama.cpp"]["argmax_agreement"] >= 0.99
    assert all(verified[q]["llama.cpp"]["tokenizer_match"] for q in QUANTS)


def test_file_holds_tokenizer_template_and_llama_layout(ggufs):
    reader = gguf.GGUFReader(ggufs["q8_0"])
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens = field("tokenizer.ggml.tokens")
    assert field("general.architecture") == "llama"
    assert field("general.name") == "tiny-vet" and field("general.recipe") == "tiny-vet-recipe"
    assert field("general.base_model.0.name") == "tests/tiny-llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "llama-bpe"
    assert len(field("tokenizer.ggml.merges")) > 0
    assert tokens[field("tokenizer.ggml.eot_token_id")] == "<|eot_id|>"
    assert tokens[field("tokenizer.ggml.bos_token_id")] == "<|begin_of_text|>"
    assert field("tokenizer.ggml.add_bos_token") is True
    assert field("tokenizer.chat_template") == LLAMA3_TEMPLATE
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["rope_freqs.weight"] == gguf.GGMLQuantizationType.F32  # Llama 3.1 rope scaling
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 176: no 32-blocks


def test_q_and_k_are_stored_in_llama_cpp_rotary_order(model_dir, ggufs):
    reader = gguf.GGUFReader(ggufs["f32"])
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    np.testing.assert_array_equal(stored["blk.0.attn_q.weight"], permute_qk(q, 4).numpy())
    np.testing.assert_array_equal(stored["blk.0.attn_k.weight"], permute_qk(k, 2).numpy())


@needs_llama_cpp
def test_chat_uses_the_embedded_template_and_stops_at_end_of_turn(ggufs):
    reply = chat_reply(ggufs["q8_0"], QUESTION)
    assert reply["chat_format"] == "chat_template.default"  # the file's template, not a guessed one
    assert reply["content"] == REPLY
    assert reply["finish_reason"] == "stop"


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_verification_catches_a_missing_rotary_permute(model_dir, tmp_path, monkeypatch, quant):
    broken = dataclasses.replace(gguf_export.ARCHS["LlamaForCausalLM"], permute_qk=False)
    monkeypatch.setitem(gguf_export.ARCHS, "LlamaForCausalLM", broken)
    path = write_gguf(model_dir, tmp_path / "unpermuted.gguf", quant)
    monkeypatch.undo()  # verify against the model as it is
    # the default check's tensor comparison alone finds every q and k, and nothing else
    found = check_tensors(model_dir, path, quant)
    assert not found["ok"]
    assert sorted(found["mismatches"]) == sorted(f"blk.{i}.attn_{x}.weight" for i in range(2) for x in "qk")
    for level in LEVELS:  # the default and the full check (transformers reading the file back) refuse it
        with pytest.raises(GGUFVerifyError, match="(?s)does not reproduce.*tensor blk.0.attn_q.weight"):
            verify_gguf(model_dir, path, quant, n_threads=1, level=level)


def test_verification_catches_swapped_and_stale_tensors(model_dir, tmp_path, monkeypatch):
    real_plan = gguf_export.plan_tensors

    def swapped(*args, **kwargs):  # gate and up of layer 1 have the same shape: only their data tells
        plans = {p.name: p for p in real_plan(*args, **kwargs)}
        gate, up = plans["blk.1.ffn_gate.weight"], plans["blk.1.ffn_up.weight"]
        gate.load, up.load = up.load, gate.load
        return list(plans.values())

    monkeypatch.setattr(gguf_export, "plan_tensors", swapped)
    path = write_gguf(model_dir, tmp_path / "swapped.gguf", "q8_0")
    monkeypatch.undo()
    found = check_tensors(model_dir, path, "q8_0")
    assert sorted(found["mismatches"]) == ["blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"]
    assert "differ from the model's weight stored as Q8_0" in found["mismatches"]["blk.1.ffn_up.weight"]
    with pytest.raises(GGUFVerifyError, match="tensor blk.1.ffn_gate.weight"):
        verify_gguf(model_dir, path, "q8_0", n_threads=1)

    # a file written before the model changed: one weight moved by 0.01 is found
    other = tmp_path / "changed"
    shutil.copytree(model_dir, other)
    path = write_gguf(other, tmp_path / "stale.gguf", "f16")
    from safetensors.torch import load_file, save_file
    weights = load_file(other / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][3, 5] += 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert list(check_tensors(other, path, "f16")["mismatches"]) == ["blk.0.ffn_down.weight"]


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_export_leaves_no_file_and_keeps_the_old_one(model_dir, tmp_path, monkeypatch, failure):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the previous, complete export")
    calls = []

    def fail_midway(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise failure
        return real(self, tensor, *args, **kwargs)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_midway)
    with pytest.raises(type(failure)):
        write_gguf(model_dir, out, "q8_0")
    assert out.read_bytes() == b"the previous, complete export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_unsupported_inputs_are_clear_errors(model_dir, tmp_path):
    with pytest.raises(GGUFExportError, match="(?s)q4_k_m.*llama.cpp's quantizer.*fix: use one of q8_0, f16, bf16, f32"):
        write_gguf(model_dir, tmp_path / "x.gguf", "q4_k_m")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(GGUFExportError, match="(?s)GPT2LMHeadModel.*no GGUF writer.*fix: supported: LlamaForCausalLM"):
        write_gguf(gpt2, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(model_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # neither byte-level nor byte fallback
    tk.train_from_iterator([QUESTION, REPLY], trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(other)
    with pytest.raises(GGUFExportError, match="(?s)neither byte-level BPE nor BPE with byte fallback.*fix:"):
        write_gguf(other, tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
