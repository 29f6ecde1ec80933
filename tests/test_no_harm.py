"""The no-harm check: a merge clearly worse than the keep model on the gate split is not returned."""

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

import softmerge.aggregation.merge as merge_module
from softmerge.aggregation import SoftMergeConfig, evaluate_state, soft_merge
from softmerge.server.strategy import SoftMerge

from flower_helpers import StubGrid, make_reply

# Every gate starts open and stays so: the merge is the plain mean of the candidates and the
# keep model, which the noisy candidates below ruin.
UNGUIDED = dict(warm_start=False, steps=0)


def _noisy(state, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) if v.dtype.is_floating_point else v.clone()
            for k, v in state.items()}


@pytest.fixture
def ruinous(honest_candidates):
    """Three models far from the global one, whose mean with it is worse than it by nats."""
    model, _ = honest_candidates
    return [_noisy(model.state_dict(), 1.0, seed) for seed in range(3)]


def test_a_rejected_merge_is_learned_again_from_closed_client_gates(honest_candidates, digits_task, ruinous):
    model, _ = honest_candidates
    gate = digits_task.gate.tensors()
    keep_loss, keep_accuracy = evaluate_state(model, model.state_dict(), *gate)

    merged, report = soft_merge(model, ruinous, gate, SoftMergeConfig(**UNGUIDED))

    # With no steps, the second attempt is its start: every client closed, the keep model alone.
    assert report.rejected_loss > keep_loss + 0.25 and report.rejected_over_margin
    assert not report.harm_fallback
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert report.gates[0][:3] == [0.0, 0.0, 0.0] and report.weights == [[0.0, 0.0, 0.0, 1.0]]
    assert report.loss_after == pytest.approx(keep_loss) and report.accuracy_after == pytest.approx(keep_accuracy)


def _open_every_gate(monkeypatch):
    """Gate learning that ends with every gate wide open, whatever its start: both attempts fail."""
    def learn(model, stacked, log_alpha, *args, **kwargs):
        with torch.no_grad():
            log_alpha.fill_(5.0)
        return 7, 0
    monkeypatch.setattr(merge_module, "_learn_gates", learn)


def test_when_the_second_attempt_fails_too_the_keep_model_is_returned(
        honest_candidates, digits_task, ruinous, monkeypatch):
    model, _ = honest_candidates
    gate = digits_task.gate.tensors()
    _open_every_gate(monkeypatch)

    merged, report = soft_merge(model, ruinous, gate, SoftMergeConfig(warm_start=False, keep_mode="candidate"))

    assert report.harm_fallback and report.rejected_loss is not None
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert report.weights == [[0.0, 0.0, 0.0, 1.0]]
    assert report.loss_after == report.loss_before
    assert report.steps == 14 and report.attempts == 2  # both attempts count
    assert all(g == 1.0 for g in report.gates[0])  # the failed attempt's gates stay for diagnosis


def test_margin_zero_turns_the_check_off(honest_candidates, digits_task, ruinous):
    model, _ = honest_candidates
    gate = digits_task.gate.tensors()

    merged, report = soft_merge(model, ruinous, gate, SoftMergeConfig(harm_margin=0.0, **UNGUIDED))

    assert report.rejected_loss is None
    assert report.loss_after > report.loss_before + 0.25
    assert evaluate_state(model, merged, *gate)[0] == pytest.approx(report.loss_after)


def test_a_wide_margin_lets_the_same_merge_through(honest_candidates, digits_task, ruinous):
    model, _ = honest_candidates
    gate = digits_task.gate.tensors()
    _, rejected = soft_merge(model, ruinous, gate, SoftMergeConfig(**UNGUIDED))

    _, report = soft_merge(model, ruinous, gate, SoftMergeConfig(harm_margin=rejected.rejected_loss,
                                                                 beat_constant=False, **UNGUIDED))

    assert report.rejected_loss is None and report.loss_after == pytest.approx(rejected.rejected_loss)


def test_an_ordinary_merge_of_honest_models_is_kept(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    _, report = soft_merge(model, locals_[:6], digits_task.gate.tensors(), SoftMergeConfig(steps=30))
    assert report.rejected_loss is None
    assert report.loss_after <= report.loss_before + 0.25


def test_a_resent_global_model_shares_the_keep_weight_when_the_keep_model_is_returned(
        honest_candidates, digits_task, ruinous, monkeypatch):
    model, _ = honest_candidates
    resent = {k: v.clone() for k, v in model.state_dict().items()}
    _open_every_gate(monkeypatch)

    _, report = soft_merge(model, ruinous + [resent], digits_task.gate.tensors(), SoftMergeConfig(warm_start=False))

    assert report.harm_fallback
    assert report.weights == [[0.0, 0.0, 0.0, 0.5, 0.5]]


def test_without_a_keep_candidate_a_rejected_merge_falls_back_at_once(
        honest_candidates, digits_task, ruinous, monkeypatch):
    model, _ = honest_candidates
    _open_every_gate(monkeypatch)

    merged, report = soft_merge(model, ruinous, digits_task.gate.tensors(),
                                SoftMergeConfig(warm_start=False, include_keep=False))

    # No keep model to learn again from: the global model is returned, no second attempt runs.
    assert report.harm_fallback and report.rejected_loss is not None
    assert report.steps == 7 and report.attempts == 1
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert report.weights == [[0.0, 0.0, 0.0]]


def test_harm_margin_must_be_a_finite_non_negative_number():
    for bad in (-0.1, float("nan"), float("inf"), "0.25"):
        with pytest.raises(ValueError, match="harm_margin"):
            SoftMergeConfig(harm_margin=bad)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("both_fail", [False, True])
def test_the_strategy_warns_and_records_trust_only_from_a_merge_that_passed(
        honest_candidates, digits_task, ruinous, monkeypatch, caplog, both_fail):
    model, locals_ = honest_candidates
    calls = []

    def learn(model, stacked, log_alpha, *args, **kwargs):
        # First attempt: every gate open (the ruinous mean). Second: the honest client and keep only.
        calls.append(1)
        with torch.no_grad():
            log_alpha.fill_(5.0)
            if len(calls) == 2 and not both_fail:
                log_alpha[:, 1:-1] = -10.0
        return 7, 0

    monkeypatch.setattr(merge_module, "_learn_gates", learn)
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(warm_start=False, keep_mode="candidate"),
                         trust=True)
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid([1, 2, 3, 4])))
    states = [locals_[0]] + ruinous
    replies = [make_reply(node, state, partition=node) for node, state in enumerate(states, start=1)]

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    merged = arrays.to_torch_state_dict()
    assert metrics["softmerge-rejected"] == 1 and metrics["softmerge-harm-fallback"] == int(both_fail)
    assert metrics["softmerge-attempts"] == 2
    assert "no-harm margin" in caplog.text
    if both_fail:
        assert "kept the global model" in caplog.text
        assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    else:
        assert "took the merge learned from closed client gates" in caplog.text
        assert metrics["softmerge-keep-weight"] == pytest.approx(0.5)
    # The retry starts every client closed: which ones it reopens says little about the rest.
    assert strategy.trust_record == {}
