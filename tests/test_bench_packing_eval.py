"""The pure computations of bench/packing.py and bench/eval_throughput.py (no model, no data)."""
from __future__ import annotations

import itertools
import math

import pytest

from bench.eval_throughput import batch_mean_loss, relative_gap, token_weighted_loss
from bench.packing import padded_batches, padded_efficiency, rows_lower_bound
from runner.data.pack import plan_bins


def test_padded_efficiency_dataset_order_and_given_order():
    lengths = [10, 2, 8, 4, 6]
    # batches [10, 2] -> 20 slots, [8, 4] -> 16, [6] -> 6: 30 real tokens in 42 slots
    assert padded_efficiency(lengths, 2) == (3, pytest.approx(30 / 42))
    # sorted by length: [10, 8] 20, [6, 4] 12, [2] 2 -> 30 / 34
    assert padded_efficiency(lengths, 2, order=[0, 2, 4, 3, 1]) == (3, pytest.approx(30 / 34))
    assert padded_efficiency([5, 5, 5], 4) == (1, 1.0)
    assert padded_efficiency([], 4) == (0, 0.0)
    assert padded_batches([3, 1, 2], 2) == [[3, 1], [2]]


def _optimal_rows(lengths, capacity):
    """Brute force: the fewest rows (for a handful of samples)."""
    n = len(lengths)
    for rows in range(1, n + 1):
        for assign in itertools.product(range(rows), repeat=n):
            fill = [0] * rows
            for i, r in zip(range(n), assign):
                fill[r] += lengths[i]
            if max(fill) <= capacity:
                return rows
    return n


@pytest.mark.parametrize("lengths", [[6, 6, 6, 2, 2, 2], [9, 8, 7, 3, 2, 1], [5, 5, 5, 5], [10, 1, 1, 1],
                                     [4, 4, 4, 3, 3, 3], [7, 6, 3, 3, 1]])
def test_rows_lower_bound_never_above_optimum_and_tight_here(lengths):
    capacity = 10
    best = _optimal_rows(lengths, capacity)
    bound = rows_lower_bound(lengths, capacity)
    assert math.ceil(sum(lengths) / capacity) <= bound <= best
    assert len(plan_bins(lengths, capacity)) >= bound


def test_rows_lower_bound_counts_samples_over_half_a_row():
    # 5 samples over half a row need 5 rows, though their tokens fit in 4
    assert rows_lower_bound([6, 6, 6, 6, 6], 10) == 5
    assert rows_lower_bound([], 10) == 0


def test_token_weighted_vs_batch_mean_loss():
    losses, tokens, rows = [1.0, 3.0], [30, 10], [4, 4]
    assert token_weighted_loss(losses, tokens) == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)  # 1.5
    assert batch_mean_loss(losses, rows, 4) == pytest.approx(2.0)  # what Trainer.evaluate reports
    # equal token counts: the two agree
    assert token_weighted_loss(losses, [7, 7]) == pytest.approx(batch_mean_loss(losses, rows, 4))
    assert math.isnan(token_weighted_loss([], []))
    with pytest.raises(ValueError):
        batch_mean_loss(losses, [5, 1], 4)
    assert relative_gap(1.01, 1.0) == pytest.approx(0.01)
