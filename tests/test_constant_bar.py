"""The no-harm check's second bar: a merge must beat the gate split's label frequencies.

Two opposite updates of an uninformed model average back to it: the merge predicts the same
distribution for every input, its loss is the constant predictor's, and the margin above the
keep model's loss lets it through. The bar sends the round to the next start instead.
"""

import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

import softmerge.aggregation.merge as merge_module
from softmerge.aggregation import SoftMergeConfig, soft_merge
from softmerge.aggregation.merge import CLIENTS_START, CLOSED_START, constant_prediction_loss
from softmerge.server.strategy import SoftMerge

from flower_helpers import StubGrid, make_reply

# Balanced labels, decided by the sign of the first input.
INPUTS = torch.tensor([[1.0, 0.3], [2.0, -0.5], [-1.0, 0.2], [-2.0, -0.4]])
GATE = (INPUTS, torch.tensor([1, 1, 0, 0]))
INFORMED = {"weight": torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), "bias": torch.zeros(2)}
FLIPPED = {name: -tensor for name, tensor in INFORMED.items()}


def _linear(scale: float = 0.0) -> nn.Linear:
    """The classifier ``scale`` of the way to INFORMED; 0 predicts one half for every input."""
    model = nn.Linear(2, 2)
    model.load_state_dict({name: scale * tensor for name, tensor in INFORMED.items()})
    return model


def _learn_by_attempt(columns_per_attempt):
    """Gate learning that opens, in its n-th call, only the columns listed n-th (the last list after)."""
    calls = []

    def learn(model, stacked, log_alpha, *args, **kwargs):
        columns = columns_per_attempt[min(len(calls), len(columns_per_attempt) - 1)]
        calls.append(1)
        with torch.no_grad():
            log_alpha.fill_(-10.0)
            log_alpha[:, columns] = 5.0
        return 5, 0
    return learn


def test_the_constant_predictors_loss_is_the_entropy_of_the_label_frequencies():
    assert constant_prediction_loss(torch.tensor([0, 1, 0, 1])) == pytest.approx(math.log(2))
    assert constant_prediction_loss(torch.tensor([2, 2, 2, 7])) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert constant_prediction_loss(torch.tensor([3, 3, 3])) is None


def test_a_merge_no_better_than_the_label_frequencies_is_learned_again(monkeypatch):
    # First two attempts: both clients open, their mean is the uninformed keep model again.
    # The last (from closed client gates): the informed client alone.
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1], [0, 1], [0]]))
    model = _linear()

    merged, report = soft_merge(model, [INFORMED, FLIPPED], GATE, SoftMergeConfig(warm_start=False))

    assert report.constant_loss == pytest.approx(math.log(2))
    assert report.loss_before == pytest.approx(math.log(2))
    assert report.rejected_loss == pytest.approx(math.log(2))
    assert report.attempts == 3 and not report.harm_fallback and not report.uninformed
    assert report.start == CLOSED_START
    assert all(torch.equal(merged[name], INFORMED[name]) for name in INFORMED)
    assert report.loss_after < math.log(2) and report.weights == [[1.0, 0.0, 0.0]]


def test_without_the_bar_the_uninformed_merge_stands(monkeypatch):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1], [0, 1], [0]]))

    for config in (SoftMergeConfig(warm_start=False, beat_constant=False),
                   SoftMergeConfig(warm_start=False, harm_margin=0.0)):
        merged, report = soft_merge(_linear(), [INFORMED, FLIPPED], GATE, config)
        assert report.attempts == 1 and report.rejected_loss is None
        assert all(torch.equal(merged[name], torch.zeros_like(tensor)) for name, tensor in INFORMED.items())


def test_when_no_start_beats_the_bar_a_keep_model_that_does_is_kept(monkeypatch):
    # The keep model is a little informed; every attempt merges the two clients to the
    # uninformed mean, within the margin above the keep model's loss.
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1]]))
    model = _linear(0.05)

    merged, report = soft_merge(model, [INFORMED, FLIPPED], GATE, SoftMergeConfig(warm_start=False))

    assert report.loss_before < math.log(2) < report.loss_before + 0.25
    assert report.attempts == 3 and report.rejected_loss == pytest.approx(math.log(2))
    assert report.harm_fallback and not report.uninformed
    assert all(torch.equal(merged[name], tensor) for name, tensor in model.state_dict().items())


def test_when_neither_a_start_nor_the_keep_model_beats_the_bar_the_first_merge_within_the_margin_stands(
        monkeypatch):
    # Every attempt merges both clients: a little flipped on the whole, within the margin
    # above the uninformed keep model, and no better than the label frequencies.
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1]]))
    overshoot = {name: -1.1 * tensor for name, tensor in INFORMED.items()}

    merged, report = soft_merge(_linear(), [INFORMED, overshoot], GATE, SoftMergeConfig(warm_start=False))

    assert math.log(2) < report.loss_after < math.log(2) + 0.25
    assert report.attempts == 3 and report.uninformed and not report.harm_fallback
    assert report.start == CLIENTS_START and report.rejected_loss == pytest.approx(report.loss_after)
    assert all(torch.allclose(merged[name], -0.05 * tensor) for name, tensor in INFORMED.items())
    assert report.weights == [[0.5, 0.5, 0.0]]


def test_a_merge_over_the_margin_still_falls_back_to_the_keep_model(monkeypatch):
    # The flipped client alone: worse than the keep model by more than the margin, on every attempt.
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[1]]))
    model = _linear(0.05)

    merged, report = soft_merge(model, [INFORMED, FLIPPED], GATE, SoftMergeConfig(warm_start=False))

    assert report.harm_fallback and report.attempts == 3
    assert all(torch.equal(merged[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_says_which_bar_a_merge_failed_and_keeps_no_record_of_the_round(monkeypatch, caplog):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1], [0, 1], [0]]))
    model = _linear()
    strategy = SoftMerge(model, GATE, SoftMergeConfig(warm_start=False), trust=True)
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid([1, 2])))
    replies = [make_reply(node, state, partition=node) for node, state in ((1, INFORMED), (2, FLIPPED))]

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    assert "no better than predicting the gate split's label frequencies (0.693)" in caplog.text
    assert "took the merge learned from closed client gates" in caplog.text
    assert metrics["softmerge-rejected"] == 1 and metrics["softmerge-attempts"] == 3
    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[name], INFORMED[name]) for name in INFORMED)
    # The first merge failed the check: the round says nothing about the clients.
    assert strategy.trust_record == {}


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_warns_when_the_first_merge_stands_uninformed_and_keeps_no_record_of_the_round(
        monkeypatch, caplog):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1]]))
    model = _linear()
    strategy = SoftMerge(model, GATE, SoftMergeConfig(warm_start=False), trust=True)
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid([1, 2])))
    overshoot = {name: -1.1 * tensor for name, tensor in INFORMED.items()}
    replies = [make_reply(node, state, partition=node) for node, state in ((1, INFORMED), (2, overshoot))]

    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = strategy.aggregate_train(1, replies)

    assert "nor does the global model (0.693): the merge from the clients alone stands" in caplog.text
    assert metrics["softmerge-uninformed"] == 1 and metrics["softmerge-harm-fallback"] == 0
    assert strategy.trust_record == {}


def test_a_model_that_predicts_the_label_frequencies_exactly_does_not_beat_them(monkeypatch):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0]]))
    targets = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1])
    frequencies = {"weight": torch.zeros(2, 2), "bias": torch.log(torch.tensor([0.25, 0.75]))}

    _, report = soft_merge(_linear(), [frequencies], (torch.randn(8, 2), targets), SoftMergeConfig(warm_start=False))

    assert report.loss_after == pytest.approx(report.constant_loss, abs=1e-6)
    assert report.uninformed and report.attempts == 3
