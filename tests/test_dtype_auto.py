"""`dtype: auto` on a CPU: bf16 where the CPU runs it natively, else float32 and a line saying why training is
slower and its numbers differ from a bf16 machine's. The CPU's flags are patched (both kinds cannot be here)."""
from __future__ import annotations

import torch

from runner.model import load
from runner.recipe.schema import ModelConfig


def test_auto_is_float32_with_a_note_without_cpu_bf16(monkeypatch):
    monkeypatch.setattr(load, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = ModelConfig(base="some/model")
    assert load.resolve_dtype(cfg) == torch.float32
    note = load.float32_note(cfg)
    assert "float32" in note and "slower" in note and "AVX512-BF16" in note


def test_no_note_where_bf16_is_native_or_the_dtype_is_chosen(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(load, "cpu_has_bf16", lambda: True)
    assert load.resolve_dtype(ModelConfig(base="some/model")) == torch.bfloat16
    assert load.float32_note(ModelConfig(base="some/model")) == ""
    monkeypatch.setattr(load, "cpu_has_bf16", lambda: False)
    assert load.float32_note(ModelConfig(base="some/model", dtype="float32")) == ""
