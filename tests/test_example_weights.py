"""Example-count weights over the selected candidates, capped at their median count."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from softmerge.aggregation import SoftMergeConfig, soft_merge
from softmerge.aggregation.merge import example_count_weights
from softmerge.server.strategy import SoftMerge

from flower_helpers import StubGrid, make_reply

NAN = math.nan


def test_selected_candidates_are_weighted_by_their_counts_capped_at_the_median():
    # Selected: 0, 1, 3 (gates above 1/2); the median of their counts is 300, so client 3's
    # 1000 counts as 300: weights 100, 300, 300 over 700.
    gates = torch.tensor([[1.0, 0.9, 0.2, 0.6, 0.0]])
    counts = torch.tensor([100.0, 300.0, 50.0, 1000.0, NAN])
    weights = example_count_weights(gates, counts, torch.full_like(gates, 0.2))
    assert weights[0].tolist() == pytest.approx([1 / 7, 3 / 7, 0.0, 3 / 7, 0.0])


def test_an_inflated_count_buys_no_more_than_the_median_selected_client():
    gates = torch.ones(1, 5)
    honest = [200.0, 400.0, 600.0, 800.0]
    truthful = example_count_weights(gates, torch.tensor(honest + [500.0]), gates / 5)
    inflated = example_count_weights(gates, torch.tensor(honest + [1e9]), gates / 5)
    # The median of (200, 400, 600, 800, 1e9) is 600: the liar weighs as much as client 2.
    assert inflated[0, 4] == pytest.approx(inflated[0, 2])
    assert inflated[0, 4] == pytest.approx(600 / (200 + 400 + 600 + 600 + 600))
    assert truthful[0, 4] == pytest.approx(500 / (200 + 400 + 500 + 500 + 500))


def test_the_keep_candidate_weighs_the_median_and_a_unit_that_selects_nothing_keeps_its_gate_weights():
    gates = torch.tensor([[0.9, 0.8, 1.0],    # two clients and the keep model selected
                          [0.3, 0.4, 0.0],    # nothing above 1/2
                          [0.0, 0.0, 1.0]])   # only the keep model
    counts = torch.tensor([100.0, 300.0, NAN])
    gate_weights = torch.tensor([[0.3, 0.3, 0.4], [3 / 7, 4 / 7, 0.0], [0.0, 0.0, 1.0]])
    weights = example_count_weights(gates, counts, gate_weights)
    assert weights[0].tolist() == pytest.approx([100 / 500, 200 / 500, 200 / 500])
    assert torch.equal(weights[1], gate_weights[1])
    assert torch.equal(weights[2], gate_weights[2])


def test_zero_counts_fall_back_to_the_gate_weights():
    gates = torch.ones(1, 2)
    weights = example_count_weights(gates, torch.tensor([0.0, 0.0]), torch.tensor([[0.5, 0.5]]))
    assert weights[0].tolist() == [0.5, 0.5]


def test_soft_merge_builds_the_merge_from_the_count_weights_it_reports(honest_candidates, digits_task):
    model, candidates = honest_candidates
    counts = [50.0 * (k + 1) for k in range(len(candidates))]
    config = SoftMergeConfig(steps=20, example_weights=True)
    merged, report = soft_merge(model, candidates, digits_task.gate.tensors(), config, examples=counts)

    weights = torch.tensor(report.weights[0])
    selected = [k for k in range(len(candidates)) if report.gates[0][k] > 0.5]
    assert selected, report.gates
    cap = torch.quantile(torch.tensor([counts[k] for k in selected], dtype=torch.float64), 0.5).item()
    expected = torch.zeros(len(candidates) + 1)
    for k in selected:
        expected[k] = min(counts[k], cap)
    assert weights.tolist() == pytest.approx((expected / expected.sum()).tolist(), abs=1e-6)
    name = "net.0.weight" if "net.0.weight" in merged else next(iter(merged))
    built = sum(float(w) * state[name] for w, state in zip(weights, candidates + [model.state_dict()]))
    assert torch.allclose(merged[name], built, atol=1e-5)

    # Off by default: the same call without the setting ignores the counts.
    _, plain = soft_merge(model, candidates, digits_task.gate.tensors(), SoftMergeConfig(steps=20), examples=counts)
    assert plain.weights != report.weights


def test_example_weights_are_checked():
    with pytest.raises(ValueError, match="example_weights needs mode 'weight'"):
        SoftMergeConfig(mode="select", example_weights=True)
    with pytest.raises(ValueError, match="example_weights must be a bool"):
        SoftMergeConfig(example_weights=1)


def test_examples_must_be_one_finite_count_per_candidate(honest_candidates, digits_task):
    model, candidates = honest_candidates
    config = SoftMergeConfig(steps=0, example_weights=True)
    for bad in ([1.0] * (len(candidates) - 1), [1.0] * (len(candidates) - 1) + [math.nan],
                [1.0] * (len(candidates) - 1) + [-5.0]):
        with pytest.raises(ValueError, match="examples must hold one finite count"):
            soft_merge(model, candidates, digits_task.gate.tensors(), config, examples=bad)


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_reads_each_reply_s_count_and_caps_a_claimed_billion(honest_candidates, digits_task):
    model, candidates = honest_candidates
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=20, example_weights=True))
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid(list(range(1, 7)))))
    counts = [100, 200, 300, 400, 500, 10**9]
    replies = [make_reply(i + 1, candidates[i], partition=i, num_examples=counts[i]) for i in range(6)]

    strategy.aggregate_train(1, replies)

    report = strategy.reports[1]
    weights = report.weights[0]
    selected = [k for k in range(6) if report.gates[0][k] > 0.5]
    assert 5 in selected, report.gates
    cap = torch.quantile(torch.tensor([float(counts[k]) for k in selected], dtype=torch.float64), 0.5).item()
    assert cap < 10**9
    # The liar weighs what the median selected client weighs, not a billion examples' worth.
    assert weights[5] == pytest.approx(cap / sum(min(counts[k], cap) for k in selected), abs=1e-6)
    assert weights[5] <= max(weights[:5]) + 1e-6
