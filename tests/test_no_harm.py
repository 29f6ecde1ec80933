"""The no-harm check: a merge clearly worse than the keep model on the gate split is not returned."""

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

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


def test_a_merge_worse_than_the_keep_model_by_the_margin_returns_the_keep_model(
        honest_candidates, digits_task, ruinous):
    model, _ = honest_candidates
    gate = digits_task.gate.tensors()
    keep_loss, keep_accuracy = evaluate_state(model, model.state_dict(), *gate)

    merged, report = soft_merge(model, ruinous, gate, SoftMergeConfig(**UNGUIDED))

    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert report.rejected_loss > keep_loss + 0.25
    assert report.loss_after == report.loss_before == pytest.approx(keep_loss)
    assert report.accuracy_after == report.accuracy_before == pytest.approx(keep_accuracy)
    assert report.weights == [[0.0, 0.0, 0.0, 1.0]]  # all on the keep candidate
    assert all(gate > 0 for gate in report.gates[0])  # the rejected merge's gates stay for diagnosis


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

    _, report = soft_merge(model, ruinous, gate, SoftMergeConfig(harm_margin=rejected.rejected_loss, **UNGUIDED))

    assert report.rejected_loss is None and report.loss_after == pytest.approx(rejected.rejected_loss)


def test_an_ordinary_merge_of_honest_models_is_kept(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    _, report = soft_merge(model, locals_[:6], digits_task.gate.tensors(), SoftMergeConfig(steps=30))
    assert report.rejected_loss is None
    assert report.loss_after <= report.loss_before + 0.25


def test_a_resent_global_model_shares_the_keep_weight_when_the_merge_is_rejected(
        honest_candidates, digits_task, ruinous):
    model, _ = honest_candidates
    resent = {k: v.clone() for k, v in model.state_dict().items()}

    _, report = soft_merge(model, ruinous + [resent], digits_task.gate.tensors(), SoftMergeConfig(**UNGUIDED))

    assert report.rejected_loss is not None
    assert report.weights == [[0.0, 0.0, 0.0, 0.5, 0.5]]


def test_harm_margin_must_be_a_finite_non_negative_number():
    for bad in (-0.1, float("nan"), float("inf"), "0.25"):
        with pytest.raises(ValueError, match="harm_margin"):
            SoftMergeConfig(harm_margin=bad)


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_broadcasts_the_global_model_warns_and_leaves_the_trust_record_alone(
        honest_candidates, digits_task, ruinous, caplog):
    model, _ = honest_candidates
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(**UNGUIDED), trust=True)
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid([1, 2, 3])))
    replies = [make_reply(node, state, partition=node) for node, state in enumerate(ruinous, start=1)]

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert metrics["softmerge-rejected"] == 1 and metrics["softmerge-keep-weight"] == 1.0
    assert "no-harm margin" in caplog.text
    assert strategy.trust_record == {}
