"""benchmarks/replica.py: the pure helpers its experiments read."""

import numpy as np
import pytest
import torch

SCRIPT_NAME = "replica"


@pytest.fixture
def replica(benchmark_script):
    return benchmark_script


def test_harm_record_discounts_every_round_and_scores_the_mean_in_standard_errors(replica):
    record = {}
    scores = replica.update_harm_record(record, {0: torch.tensor([1.0, 3.0, 2.0])}, clients=2)
    # Mean 2, (population) standard deviation sqrt(2/3) over 3 examples.
    spread = (2 / 3) ** 0.5
    assert scores == {0: pytest.approx(2 / (spread / 3 ** 0.5))}
    assert record[1] == (0.0, 0.0, 0.0)  # never open: no evidence, no score
    # A round without evidence still discounts: the mean stays, the count (and so z) shrinks.
    scores = replica.update_harm_record(record, {}, clients=2)
    assert record[0] == pytest.approx((0.9 * 6, 0.9 * 14, 0.9 * 3))
    assert scores[0] == pytest.approx(2 / (spread / (0.9 * 3) ** 0.5))


def test_closing_a_client_renormalises_the_others(replica):
    weights = np.array([[0.5, 0.25, 0.25], [0.0, 0.5, 0.5]])
    closed = replica.without_malicious(weights, {1})
    assert closed == pytest.approx(np.array([[2 / 3, 0.0, 1 / 3], [0.0, 0.0, 1.0]]))
