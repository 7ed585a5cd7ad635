"""QLoRA for real on the CPU: a 4-bit nf4 base through bitsandbytes, a LoRA adapter on top; the loss goes down."""
from __future__ import annotations

import pytest

from runner.train.metrics import read_metrics
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from runner.run_dir import RunDir
from train_support import chat_data, tiny_base, write_recipe


def test_qlora_trains_on_cpu_and_loss_goes_down(tmp_path):
    pytest.importorskip("bitsandbytes")  # a core dependency: present whenever the project is installed
    base = tiny_base(tmp_path)
    chat_data(tmp_path / "d.jsonl", 16)
    recipe = load_recipe(write_recipe(tmp_path, f"""
        name: qlora
        output_dir: {tmp_path / 'runs'}
        model: {{base: {base}, chat_template: llama-3, max_seq_length: 96, load_in_4bit: true, dtype: float32}}
        lora: {{r: 8, alpha: 16}}
        stages:
          - name: s
            data: {{source: d.jsonl, format: messages, val_size: 0}}
            train: {{max_steps: 25, learning_rate: 1e-2, micro_batch_size: 8, logging_steps: 1, warmup_steps: 0}}
        """))
    (outcome,) = train_recipe(recipe, log=lambda m: None)
    import bitsandbytes as bnb
    from runner.model.load import load_base

    model = load_base(str(base), recipe.model, __import__("torch").float32)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # the base really is 4-bit
    losses = [r["loss"] for r in read_metrics(RunDir.of(recipe).path / "s" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses  # observed ~0.85
