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
from softmerge.aggregation.merge import (CLIENTS_START, CLOSED_START, DIRECTION_START, constant_prediction_loss,
                                        direction_trust)
from softmerge.aggregation.robust import flatten_updates, fltrust_server_model, fltrust_trust_scores
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
    assert report.rejected_loss == pytest.approx(math.log(2)) and not report.rejected_over_margin
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

    merged, report = soft_merge(_linear(), [INFORMED, overshoot], GATE,
                                SoftMergeConfig(warm_start=False, uninformed_merge="first"))

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
    strategy = SoftMerge(model, GATE, SoftMergeConfig(warm_start=False, uninformed_merge="first"), trust=True)
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


# uninformed_merge="direction": when nothing beats the bar, update directions weigh the candidates.
DIRECTION = SoftMergeConfig(warm_start=False, uninformed_merge="direction")
OVERSHOOT = {name: -1.1 * tensor for name, tensor in INFORMED.items()}


def test_direction_trust_is_the_relu_cosine_with_the_servers_own_update_on_the_gate_split():
    model = _linear()
    keep = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    states = [INFORMED, OVERSHOOT, keep, {name: tensor + 0.5 for name, tensor in INFORMED.items()}]

    scores = direction_trust(model, keep, states, GATE, DIRECTION)

    trained, _ = fltrust_server_model(model, keep, GATE, epochs=DIRECTION.server_epochs,
                                      learning_rate=DIRECTION.server_lr, batch_size=DIRECTION.server_batch_size,
                                      momentum=DIRECTION.server_momentum, seed=DIRECTION.seed)
    server = torch.cat([(trained[name] - keep[name]).reshape(-1) for name in ("weight", "bias")]).double()
    for state, score in zip(states, scores.tolist()):
        update = torch.cat([(state[name] - keep[name]).reshape(-1) for name in ("weight", "bias")]).double()
        cosine = 0.0 if float(update.norm()) == 0 else float(update @ server / (update.norm() * server.norm()))
        assert score == pytest.approx(max(0.0, cosine))
    # The informed update points where the server's does; its overshooting opposite, away.
    assert scores[0] > 0.9 and scores[1] == 0 and scores[2] == 0
    # The model is only read.
    assert all(torch.equal(model.state_dict()[name], keep[name]) for name in keep)


def test_direction_trust_streams_fltrusts_formula_over_many_candidates():
    model = _linear()
    keep = model.state_dict()
    generator = torch.Generator().manual_seed(0)
    states = [{name: torch.randn(tensor.shape, generator=generator) for name, tensor in INFORMED.items()}
              for _ in range(40)] + [dict(keep)]

    scores = direction_trust(model, keep, states, GATE, DIRECTION)

    trained, _ = fltrust_server_model(model, keep, GATE, epochs=DIRECTION.server_epochs,
                                      learning_rate=DIRECTION.server_lr, batch_size=DIRECTION.server_batch_size,
                                      momentum=DIRECTION.server_momentum, seed=DIRECTION.seed)
    names = ["weight", "bias"]
    _, updates = flatten_updates(keep, states, names)
    _, (server,) = flatten_updates(keep, [trained], names)
    assert torch.allclose(scores, fltrust_trust_scores(updates, server), atol=1e-12)
    # Random directions: some point with the server's update, some against; an unchanged model has none.
    assert (scores == 0).any() and (scores > 0).any() and scores[-1] == 0


def test_when_nothing_beats_the_bar_the_update_directions_weigh_the_candidates(monkeypatch):
    # Gate learning opens both clients on every attempt: their merge is uninformed.
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1]]))

    merged, report = soft_merge(_linear(), [INFORMED, OVERSHOOT], GATE, DIRECTION)

    # Only the informed update points where the server's does, and its merge beats the bar.
    assert report.start == DIRECTION_START and report.attempts == 3
    assert not report.uninformed and not report.harm_fallback
    assert report.rejected_loss is not None and report.loss_after < report.constant_loss
    assert report.weights == [[1.0, 0.0, 0.0]] and report.gates == [[1.0, 0.0, 0.0]]
    assert all(torch.allclose(merged[name], INFORMED[name]) for name in INFORMED)


def test_a_direction_merge_that_still_does_not_beat_the_bar_stands_uninformed(monkeypatch):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1]]))
    monkeypatch.setattr(merge_module, "direction_trust",
                        lambda *args, **kwargs: torch.tensor([1.0, 0.0], dtype=torch.float64))
    # Input-blind, and a little off the balanced label frequencies.
    weak = {"weight": torch.zeros(2, 2), "bias": torch.tensor([0.01, -0.01])}

    merged, report = soft_merge(_linear(), [weak, OVERSHOOT], GATE, DIRECTION)

    assert report.start == DIRECTION_START and report.uninformed and not report.harm_fallback
    assert report.weights == [[1.0, 0.0, 0.0]]
    assert all(torch.allclose(merged[name], weak[name]) for name in weak)


@pytest.mark.parametrize("scores, reason", [([0.0, 1.0], "over the margin"), ([0.0, 0.0], "nobody aligned")])
def test_without_a_usable_direction_merge_the_first_merge_within_the_margin_stands(monkeypatch, scores, reason):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1]]))
    monkeypatch.setattr(merge_module, "direction_trust",
                        lambda *args, **kwargs: torch.tensor(scores, dtype=torch.float64))

    merged, report = soft_merge(_linear(), [INFORMED, OVERSHOOT], GATE, DIRECTION)

    assert report.start == CLIENTS_START and report.uninformed and not report.harm_fallback, reason
    assert report.weights == [[0.5, 0.5, 0.0]]
    assert all(torch.allclose(merged[name], -0.05 * tensor) for name, tensor in INFORMED.items())


def test_a_keep_model_that_beats_the_bar_is_kept_without_asking_the_directions(monkeypatch):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1]]))
    monkeypatch.setattr(merge_module, "direction_trust", lambda *args, **kwargs: pytest.fail("not uninformed"))
    model = _linear(0.05)

    merged, report = soft_merge(model, [INFORMED, FLIPPED], GATE, DIRECTION)

    assert report.harm_fallback and not report.uninformed
    assert all(torch.equal(merged[name], tensor) for name, tensor in model.state_dict().items())


def test_identical_replies_share_one_direction_weight(monkeypatch):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1]]))
    half = {name: 0.5 * tensor for name, tensor in INFORMED.items()}

    merged, report = soft_merge(_linear(), [INFORMED, OVERSHOOT, half, half, half], GATE, DIRECTION)

    # Three copies of one reply are one candidate: each holds a third of its weight.
    assert report.start == DIRECTION_START
    assert report.weights[0][:2] == pytest.approx([0.5, 0.0])
    assert report.weights[0][2:5] == pytest.approx([0.5 / 3] * 3) and report.weights[0][5] == 0
    assert all(torch.allclose(merged[name], 0.75 * INFORMED[name]) for name in INFORMED)


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_says_when_the_update_directions_made_the_merge(monkeypatch, caplog):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1]]))
    model = _linear()
    strategy = SoftMerge(model, GATE, DIRECTION, trust=True)
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid([1, 2])))
    replies = [make_reply(node, state, partition=node) for node, state in ((1, INFORMED), (2, OVERSHOOT))]

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    assert "took the merge weighted by the update directions" in caplog.text
    assert metrics["softmerge-uninformed"] == 0 and metrics["softmerge-harm-fallback"] == 0
    merged = arrays.to_torch_state_dict()
    assert all(torch.allclose(merged[name], INFORMED[name]) for name in INFORMED)
    # Gate learning failed the bar: the round still says nothing about the clients.
    assert strategy.trust_record == {}


def test_the_aligned_merge_is_fedavg_over_the_aligned_clients_with_counts_capped_at_their_median(monkeypatch):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 2]]))
    half = {name: 0.5 * tensor for name, tensor in INFORMED.items()}
    config = SoftMergeConfig(warm_start=False, uninformed_merge="aligned")

    merged, report = soft_merge(_linear(), [INFORMED, half, OVERSHOOT], GATE, config, examples=[10, 30, 50])

    # The overshooting client points away and claims the most examples: it gets nothing. The
    # median of the aligned counts (10, 30) is 20, so their weights are 10 : 20.
    assert report.start == DIRECTION_START and not report.uninformed
    assert report.weights[0] == pytest.approx([1 / 3, 2 / 3, 0.0, 0.0])
    assert all(torch.allclose(merged[name], 2 / 3 * INFORMED[name]) for name in INFORMED)


def test_an_uninformed_global_model_that_every_start_worsens_past_the_margin_gives_way_to_the_aligned_merge(
        monkeypatch):
    # Every attempt opens only the wildly overshooting client: over the margin each time.
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[1]]))
    wild = {name: -30.0 * tensor for name, tensor in INFORMED.items()}

    old_rule = SoftMergeConfig(warm_start=False, uninformed_merge="first")
    _, first = soft_merge(_linear(), [INFORMED, wild], GATE, old_rule)
    merged, aligned = soft_merge(_linear(), [INFORMED, wild], GATE, SoftMergeConfig(warm_start=False), examples=[5, 5])

    # The old rule kept the untrained global model; the aligned merge is the informed client.
    assert first.harm_fallback and first.attempts == 3
    assert not aligned.harm_fallback and aligned.start == DIRECTION_START and not aligned.uninformed
    assert aligned.weights == [[1.0, 0.0, 0.0]]
    assert all(torch.allclose(merged[name], INFORMED[name]) for name in INFORMED)


def test_without_example_counts_the_aligned_merge_weighs_by_direction_trust(monkeypatch):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 2]]))
    monkeypatch.setattr(merge_module, "direction_trust",
                        lambda *args, **kwargs: torch.tensor([0.2, 0.6, 0.0], dtype=torch.float64))
    half = {name: 0.5 * tensor for name, tensor in INFORMED.items()}

    _, report = soft_merge(_linear(), [INFORMED, half, OVERSHOOT], GATE, SoftMergeConfig(warm_start=False))

    assert report.start == DIRECTION_START and report.weights[0] == pytest.approx([0.25, 0.75, 0.0, 0.0])


def test_a_server_update_that_is_not_finite_trusts_nobody_and_the_first_merge_stands(monkeypatch):
    monkeypatch.setattr(merge_module, "_learn_gates", _learn_by_attempt([[0, 1]]))
    diverged = {name: torch.full_like(tensor, math.nan) for name, tensor in INFORMED.items()}
    monkeypatch.setattr(merge_module, "fltrust_server_model", lambda *args, **kwargs: (diverged, math.nan))

    assert torch.equal(direction_trust(_linear(), _linear().state_dict(), [INFORMED], GATE, DIRECTION),
                       torch.zeros(1, dtype=torch.float64))
    merged, report = soft_merge(_linear(), [INFORMED, OVERSHOOT], GATE, SoftMergeConfig(warm_start=False))

    assert report.start == CLIENTS_START and report.uninformed and not report.harm_fallback
    assert all(torch.isfinite(tensor).all() for tensor in merged.values())
