"""The pure computations of bench/train_throughput.py: token counts, padding waste, model FLOPs, MFU."""
from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def tt():
    return importlib.import_module("bench.train_throughput")


def test_batch_counts_with_attention_mask(tt):
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[5, 6, 7, -100], [5, 6, -100, -100]])  # TRL: every real token is a label
    c = tt.batch_counts(ids, labels, mask, pad_id=0)
    # the first position's label predicts nothing: 2 + 1 label-bearing positions after the shift
    assert c == {"slots": 8, "real": 5, "trained": 3}


def test_batch_counts_packed_rows_use_pad_id(tt):
    ids = torch.tensor([[9, 9, 9, 9, 9, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 9, 9, -100, -100, -100, -100]])
    c = tt.batch_counts(ids, labels, None, pad_id=0)
    assert c == {"slots": 8, "real": 5, "trained": 2}


def test_padding_waste(tt):
    assert tt.padding_waste(8, 5) == pytest.approx(3 / 8)
    assert tt.padding_waste(0, 0) == 0.0
    assert tt.padding_waste(10, 10) == 0.0


def test_body_linear_params_gemma3_270m(tt):
    # hidden 640, MLP 2048, 4 query heads and 1 kv head of 256, 18 layers
    per_layer = 640 * 1024 + 2 * 640 * 256 + 1024 * 640 + 3 * 640 * 2048
    assert tt.body_linear_params(640, 2048, 4, 1, 256, 18) == 18 * per_layer == 100_270_080


def test_train_flops_terms(tt):
    assert tt.train_flops(10, 0, 1000, 0, 0) == 4 * 1000 * 10          # forward + activation-gradient backward
    assert tt.train_flops(0, 3, 0, 500, 0) == 4 * 500 * 3              # head only where the loss is computed
    assert tt.train_flops(10, 0, 0, 0, 7) == 6 * 7 * 10                # LoRA: forward, input and weight grads
    assert tt.train_flops(10, 3, 1000, 500, 7) == 40_000 + 6_000 + 420


def test_mfu(tt):
    assert tt.mfu(2e12, 2.0, 1000.0) == pytest.approx(1.0)              # 1 TFLOP/s against a 1000 GFLOP/s peak
    assert tt.mfu(1e11, 1.0, 200.0) == pytest.approx(0.5)
    assert tt.mfu(1e11, 0.0, 200.0) == 0.0


@pytest.mark.parametrize("backend", ["hf", "axolotl"])
def test_backends_bench_overrides_make_a_valid_quickstart(backend, tmp_path):
    """bench/backends.py shortens the quickstart with --set; the recipe's validation must accept what it gives."""
    from bench.backends import RECIPE, shortened
    from runner.recipe import load_recipe

    sets = shortened(6, tmp_path, backend)
    recipe = load_recipe(RECIPE, sets[1::2])
    assert recipe.backend == backend and recipe.export is None
    assert [s.train.max_steps for s in recipe.stages] == [6, 6]
