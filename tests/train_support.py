"""Helpers for training tests: a tiny Llama base folder, tiny chat data and a recipe around them."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tiny_models import make_tiny_llama, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def tiny_base(folder: Path) -> Path:
    """A saved tiny Llama (random init) with a byte-level BPE tokenizer and the llama-3 template."""
    base = folder / "tiny-llama"
    if not (base / "config.json").is_file():
        tokenizer = make_tokenizer(folder / "tok")
        make_tiny_llama(base, tokenizer)
    return base


def chat_data(path: Path, n: int, topic: str = "cats") -> Path:
    """n short two-turn conversations, varied enough for a validation set to mean something."""
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "user", "content": f"Question {i} about {topic}: what should I feed a {topic[:-1]} aged {i % 12 + 1}?"},
            {"role": "assistant", "content": f"A {topic[:-1]} aged {i % 12 + 1} needs fresh water and a balanced diet."},
        ]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def two_stage_recipe(folder: Path, *, init: str = "continue", extra_train: str = "", name: str = "two") -> Path:
    base = tiny_base(folder)
    chat_data(folder / "general.jsonl", 48, "cats")
    chat_data(folder / "vet.jsonl", 32, "dogs")
    return write_recipe(folder, f"""
        name: {name}
        output_dir: {folder / 'runs'}
        seed: 7
        model: {{base: {base}, chat_template: llama-3, max_seq_length: 128, dtype: float32}}
        lora: {{r: 4, alpha: 8, target_modules: all-linear}}
        stages:
          - name: general
            data: {{source: general.jsonl, format: messages, val_size: 8}}
            train: {{max_steps: 6, learning_rate: 5e-3, micro_batch_size: 4, eval_steps: 2, save_steps: 2, logging_steps: 1{extra_train}}}
          - name: vet
            init: {init}
            data: {{source: vet.jsonl, format: messages, val_size: 8}}
            train: {{max_steps: 4, learning_rate: 5e-3, micro_batch_size: 4, eval_steps: 2, save_steps: 2, logging_steps: 1{extra_train}}}
        """)


def quickstart_like(folder: Path, name: str = "two", seed: int = 7) -> Path:
    """two_stage_recipe trained as the quickstart trains: packed rows, and the end-of-turn token's embedding row
    trained at a learning rate of its own (lora.trainable_tokens, train.trainable_tokens_lr). A loss row every 4
    steps, so the first step's comes from logging the first step (hf: logging_first_step; axolotl: its plugin)."""
    path = two_stage_recipe(folder, name=name, extra_train=", packing: true, trainable_tokens_lr: 0.05")
    text = path.read_text().replace("logging_steps: 1", "logging_steps: 4").replace("seed: 7", f"seed: {seed}")
    path.write_text(text.replace("target_modules: all-linear}",
                                 "target_modules: all-linear, trainable_tokens: ['<|eot_id|>']}"))
    return path

def launch_recipe(folder: Path, name: str, micro: int, *, load_in_4bit: bool = False) -> Path:
    """two_stage_recipe for launches of several processes: the first stage keeps its best adapter, the second its
    last, and the end-of-turn token's rows are trained too (lora.trainable_tokens), as in the quickstart."""
    recipe = two_stage_recipe(folder, name=name)
    text = recipe.read_text().replace("micro_batch_size: 4", f"micro_batch_size: {micro}")
    text = text.replace("lora: {r: 4, alpha: 8, target_modules: all-linear}",
                        "lora: {r: 4, alpha: 8, target_modules: all-linear, trainable_tokens: ['<|eot_id|>']}")
    text = text.replace("save_steps: 2, logging_steps: 1}", "save_steps: 2, logging_steps: 1, keep: best}", 1)
    if load_in_4bit:
        text = text.replace("dtype: float32}", "dtype: float32, load_in_4bit: true}")
    recipe.write_text(text)
    return recipe


def nan_base(folder: Path) -> Path:
    """The tiny Llama with one NaN weight (its final norm): every logit is NaN from the first forward pass on,
    which is what a model overflowing in its dtype (Gemma 3 in float16) gives a trainer."""
    import torch
    from safetensors.torch import load_file, save_file

    good = tiny_base(folder)
    bad = folder / "tiny-llama-nan"
    if not (bad / "config.json").is_file():
        import shutil

        shutil.copytree(good, bad)
        weights = load_file(bad / "model.safetensors")
        weights["model.norm.weight"][0] = torch.nan
        save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def stage_started(stage) -> bool:
    """A stage that began training: an outcome or a metrics row (its version folder is made before training)."""
    return stage.outcome() is not None or stage.metrics.exists()
