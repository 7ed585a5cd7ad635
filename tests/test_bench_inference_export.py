"""The pure computations of bench/gguf_inference.py and bench/export.py: weight bytes a decode step reads
(from a GGUF's own tensor list), KV bytes, the bandwidth bound and the fraction reached, tokens/s from
timestamps, and peak RSS against the fp32 model size."""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, file: str):
    return importlib.import_module("bench." + file.removesuffix(".py"))


@pytest.fixture(scope="module")
def gi():
    return _load("bench_gguf_inference", "gguf_inference.py")


@pytest.fixture(scope="module")
def ex():
    return _load("bench_export", "export.py")


VOCAB, DIM, FF = 256, 64, 128
Q8 = gguf.GGMLQuantizationType.Q8_0


def write_tiny_gguf(path: Path, tied: bool) -> dict[str, int]:
    """A tiny two-tensor-kinds GGUF (Q8_0 matrices, F32 norms); returns each tensor's expected bytes."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_sliding_window(4)
    w.add_sliding_window_pattern([True, False])
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (VOCAB, DIM)}
    for i in range(2):
        tensors |= {f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.ffn_up.weight": (FF, DIM),
                    f"blk.{i}.ffn_down.weight": (DIM, FF)}
    if not tied:
        tensors["output.weight"] = (VOCAB, DIM)
    expected = {}
    for name, shape in tensors.items():
        data = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2:
            q = gguf.quants.quantize(data, Q8)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=Q8)
            expected[name] = math.prod(shape) // 32 * 34  # Q8_0: 32 values in 34 bytes
        else:
            w.add_tensor(name, data)
            expected[name] = math.prod(shape) * 4
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_bytes_per_token_tied_reads_the_embedding_whole(gi, tmp_path):
    expected = write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    facts = gi.gguf_facts(tmp_path / "tied.gguf")
    assert facts["tied_output"]
    assert {n: b for n, b, _ in facts["tensors"]} == expected
    assert gi.bytes_per_token(facts["tensors"]) == sum(expected.values())
    assert (facts["n_layers"], facts["n_kv_heads"], facts["key_length"], facts["sliding_window"]) == (2, 1, 16, 4)
    assert facts["sliding_layers"] == [True, False]


def test_bytes_per_token_untied_reads_one_embedding_row(gi, tmp_path):
    expected = write_tiny_gguf(tmp_path / "untied.gguf", tied=False)
    facts = gi.gguf_facts(tmp_path / "untied.gguf")
    assert not facts["tied_output"]
    row = DIM // 32 * 34
    assert gi.bytes_per_token(facts["tensors"]) == sum(expected.values()) - expected["token_embd.weight"] + row


def test_bytes_per_token_from_a_plain_list(gi):
    # GGUF shapes list the row length first: token_embd [dim, vocab]
    tensors = [("token_embd.weight", 1000, (10, 100)), ("blk.0.ffn_up.weight", 500, (10, 50)),
               ("output.weight", 1000, (10, 100))]
    assert gi.bytes_per_token(tensors) == 10 + 500 + 1000
    assert gi.bytes_per_token(tensors[:2]) == 1500  # tied: the table is the logits' weight


def test_kv_bytes_respect_the_sliding_window(gi):
    # 2 layers, 1 KV head, K and V of 16: 64 bytes a cached token a layer in f16
    assert gi.kv_bytes_per_token(2, 1, 16, 16, context=10) == 2 * 10 * 64
    assert gi.kv_bytes_per_token(2, 1, 16, 16, context=10, sliding_window=4, sliding_layers=[True, False]) == \
        (4 + 10) * 64


def test_bound_and_fraction(gi):
    bound = gi.bound_tokens_per_s(285e6, 20.0)  # 285 MB a token at 20 GB/s
    assert bound == pytest.approx(70.175, rel=1e-3)
    assert gi.bound_fraction(49.1, bound) == pytest.approx(0.7, abs=1e-3)
    assert gi.bound_tokens_per_s(0, 20.0) == float("inf")
    assert math.isnan(gi.bound_fraction(10.0, 0.0))


def test_rates_from_timestamps(gi):
    r = gi.rates(t_start=0.0, stamps=[2.0, 2.5, 3.0, 3.5], n_prompt=300)
    assert r["prompt_tok_s"] == pytest.approx(150.0)  # 300 prompt tokens before the first token at 2 s
    assert r["gen_tok_s"] == pytest.approx(2.0)  # 3 decode steps in 1.5 s
    assert r["n_generated"] == 4
    assert math.isnan(gi.rates(0.0, [1.0], 10)["gen_tok_s"])


def test_rss_ratio_against_fp32_size(ex):
    n = 268_098_176  # Gemma 3 270M
    assert ex.fp32_mib(n) == pytest.approx(1022.7, abs=0.1)
    assert ex.rss_ratio(2045.4, n) == pytest.approx(2.0, abs=0.01)
    assert math.isnan(ex.rss_ratio(100.0, 0))
