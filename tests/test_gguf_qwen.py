"""Qwen2 (q/k/v biases) and Qwen3 (q/k norms, tied embeddings) go through the same writer: random tiny
models, checked by both readers."""
from __future__ import annotations

import pytest
import torch
from tiny_gguf_models import llama_tokenizer, one_thread, randomize_norms, save

from runner.export.gguf_writer import write_gguf
from runner.export.gguf_verify import llama_cpp_skip_reason, verify_gguf


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_qwen_round_trips(kind, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_class, model_class = classes[kind]
    with one_thread():
        tokenizer = llama_tokenizer()
        torch.manual_seed(0)
        # +8: for a qwen folder AutoTokenizer picks Qwen2Tokenizer, which adds <|endoftext|>
        config = config_class(vocab_size=len(tokenizer) + 8, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=512, tie_word_embeddings=kind == "qwen3")
        model = randomize_norms(model_class(config), 0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
        model_dir = save(model, tokenizer, tmp_path / "merged")
        result = verify_gguf(model_dir, write_gguf(model_dir, tmp_path / "m.gguf", "f32"), "f32", n_threads=1,
                             level="full")
    assert result["transformers"]["max_abs_diff"] == 0.0
    assert result["tensors"]["ok"] and result["tensors"]["n_tensors"] > 0
    if llama_cpp_skip_reason() is None:
        assert result["llama.cpp"]["rel_max_diff"] < 0.001
        assert result["llama.cpp"]["tokenizer_match"]
