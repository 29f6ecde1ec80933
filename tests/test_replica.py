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


def test_collude_with_mimic_fixed_copies_the_same_honest_client_every_round(replica):
    from softmerge.simulations.colluding import FixedMimic

    generator = torch.Generator().manual_seed(0)
    global_state = {"w": torch.zeros(6), "steps": torch.tensor(0)}
    skew = torch.randn(6, 6, generator=generator)
    tracker, copied = FixedMimic(), []
    for round_number in range(1, 5):
        candidates = [{"w": 0.5 * skew[p] + torch.randn(6, generator=generator), "steps": torch.tensor(1)}
                      for p in range(6)]
        honest = [dict(c) for c in candidates]
        replica.collude(candidates, global_state, {4, 5}, "mimic-fixed", round_number, seed=0, tracker=tracker)
        matches = [p for p in range(4) if torch.allclose(candidates[4]["w"], honest[p]["w"])]
        assert len(matches) == 1 and torch.equal(candidates[4]["w"], candidates[5]["w"])
        copied.append(matches[0])
    assert copied == [tracker.target] * 4


def test_selection_counts_a_direction_round_by_its_merge_not_the_attempt_it_replaced(replica):
    from types import SimpleNamespace

    from softmerge.aggregation.merge import CLIENTS_START, DIRECTION_START

    # The replaced attempt had candidate 0 open; the direction merge weights 1 and 2.
    gates, log_alpha = [[0.0, 1.0, 1.0]], [[2.0, -3.0, -3.0]]
    direction = SimpleNamespace(start=DIRECTION_START, gates=gates, log_alpha=log_alpha)
    assert [p for p, value in enumerate(replica.merged_openness(direction)[0]) if value > 0] == [1, 2]
    gated = SimpleNamespace(start=CLIENTS_START, gates=gates, log_alpha=log_alpha)
    assert replica.merged_openness(gated) == log_alpha
