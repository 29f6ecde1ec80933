"""The soft merge: units, mixing weights, exact selection, exclusion and extreme candidates."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from softmerge.aggregation import (
    SoftMergeConfig,
    build_merge_units,
    evaluate_state,
    mixing_weights,
    soft_merge,
    validate_candidates,
)
from softmerge.aggregation.gates import LOG_ALPHA_CLOSED
from softmerge.aggregation.merge import (LOG_ALPHA_MIN, best_class_gain, checked_split, duplicate_groups, is_flipped,
                                        is_specialist, mirror_log_alpha, mirror_state, mirror_statistics,
                                        per_example_losses, warm_start_log_alpha)


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.bn(self.fc(x)))


def _perturbed(model, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=generator)) if v.dtype.is_floating_point else v.clone()
            for k, v in model.state_dict().items()}


def test_layer_units_group_weight_bias_and_buffers():
    units = build_merge_units(BatchNormNet(), "layer")
    assert [u.name for u in units] == ["fc", "bn", "head"]
    bn = units[1].tensor_names
    assert set(bn) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}


def test_model_tensor_and_pattern_units():
    net = BatchNormNet()
    assert len(build_merge_units(net, "model")) == 1
    assert len(build_merge_units(net, "tensor")) == len(net.state_dict())
    units = build_merge_units(net, ["fc.*", "head.*"])
    assert [u.name for u in units] == ["fc.*", "head.*", "rest"]
    assert all(name.startswith("bn.") for name in units[2].tensor_names)
    # A pattern that takes nothing is an error, not a silent whole-model "rest" unit.
    with pytest.raises(ValueError, match="'hed.*' matches no tensor"):
        build_merge_units(net, ["fc.*", "hed.*"])
    with pytest.raises(ValueError, match="'fc.weight' matches no tensor"):
        build_merge_units(net, ["fc.*", "fc.weight"])

    from softmerge.server.strategy import SoftMerge

    with pytest.raises(ValueError, match="'hed.*' matches no tensor"):
        SoftMerge(net, (torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)), SoftMergeConfig(units=["hed.*"]))


def test_weight_mode_is_convex_and_closed_units_fall_back():
    gates = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    weights = mixing_weights(gates, "weight", torch.tensor([2, 2]))
    torch.testing.assert_close(weights[0], torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(weights[1], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(mixing_weights(gates, "sum", torch.tensor([2, 2]))[0], gates[0])


def test_select_mode_forward_is_exactly_one_hot_with_a_soft_gradient():
    log_alpha = torch.tensor([[0.3, 1.0, -0.2]], requires_grad=True)
    gates = torch.sigmoid(log_alpha)
    weights = mixing_weights(gates, "select", torch.tensor([0]))
    assert weights.tolist() == [[0.0, 1.0, 0.0]]
    (weights * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    assert float(log_alpha.grad.abs().sum()) > 0


def test_one_hot_gates_reproduce_the_chosen_candidate_exactly():
    net = BatchNormNet()
    candidates = [_perturbed(net, 0.5, seed) for seed in range(4)]
    units = build_merge_units(net, "layer")
    for chosen in range(4):
        start = torch.full((len(units), 5), LOG_ALPHA_MIN)
        start[:, chosen] = 5.0
        # On random labels a chosen candidate may well be worse than the keep model: no no-harm check.
        merged, report = soft_merge(net, candidates, (torch.randn(8, 4), torch.randint(0, 2, (8,))),
                                    SoftMergeConfig(units="layer", mode="select", steps=0, harm_margin=0.0),
                                    labels=list("abcd"),
                                    initial_log_alpha=start)
        for name, tensor in candidates[chosen].items():
            assert torch.equal(merged[name], tensor), name
        assert all(row[chosen] == 1.0 for row in report.weights)


def test_merge_never_changes_candidates_or_the_model():
    net = BatchNormNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    candidates = [_perturbed(net, 0.1, s) for s in range(3)]
    copies = [{k: v.clone() for k, v in c.items()} for c in candidates]
    soft_merge(net, candidates, (torch.randn(16, 4), torch.randint(0, 2, (16,))), SoftMergeConfig(steps=5))
    for candidate, copy in zip(candidates, copies):
        assert all(torch.equal(candidate[k], copy[k]) for k in copy)
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)


def test_validation_excludes_mismatched_and_non_finite_candidates():
    net = BatchNormNet()
    good = _perturbed(net, 0.1, 0)
    missing = {k: v for k, v in good.items() if k != "head.bias"}
    extra = dict(good, **{"extra.weight": torch.zeros(1)})
    shape = dict(good, **{"fc.weight": torch.zeros(4, 3)})
    dtype = dict(good, **{"fc.weight": good["fc.weight"].double()})
    nan = dict(good, **{"fc.bias": torch.tensor([0.0, float("nan"), 0.0])})
    inf = dict(good, **{"head.weight": torch.full((2, 3), float("inf"))})
    valid, excluded = validate_candidates(net.state_dict(), [good, missing, extra, shape, dtype, nan, inf, {}])
    assert valid == [0]
    reasons = {e.index: e.reason for e in excluded}
    assert "missing" in reasons[1] and "unexpected" in reasons[2] and "shape" in reasons[3]
    assert "dtype" in reasons[4] and "non-finite" in reasons[5] and "non-finite" in reasons[6]
    assert "empty" in reasons[7]


def test_nothing_valid_returns_the_keep_candidate():
    net = BatchNormNet()
    bad = dict(_perturbed(net, 0.1, 0), **{"fc.bias": torch.full((3,), float("nan"))})
    merged, report = soft_merge(net, [bad], (torch.randn(8, 4), torch.randint(0, 2, (8,))))
    assert all(torch.equal(merged[k], v) for k, v in net.state_dict().items())
    assert len(report.excluded) == 1 and report.candidates == ["keep"]
    assert all(row == [1.0] for row in report.weights)
    # Without a keep candidate there is nothing to gate: the model's own state comes back.
    merged, report = soft_merge(net, [bad], (torch.randn(8, 4), torch.randint(0, 2, (8,))),
                                SoftMergeConfig(include_keep=False))
    assert all(torch.equal(merged[k], v) for k, v in net.state_dict().items())
    assert report.candidates == [] and report.fallback_units == report.units


def test_a_keep_state_that_does_not_fit_the_model_is_refused_by_name():
    net = BatchNormNet()
    validation = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    wrong_shape = dict(net.state_dict(), **{"fc.weight": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match=r"keep state does not match the model: 'fc.weight' has shape"):
        soft_merge(net, [_perturbed(net, 0.1, 0)], validation, keep=wrong_shape)
    not_finite = dict(net.state_dict(), **{"head.bias": torch.tensor([0.0, float("nan")])})
    with pytest.raises(ValueError, match="non-finite"):
        soft_merge(net, [_perturbed(net, 0.1, 0)], validation, keep=not_finite)


def test_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="mode"):
        SoftMergeConfig(mode="average")
    with pytest.raises(ValueError, match="units"):
        SoftMergeConfig(units="neuron")
    with pytest.raises(ValueError, match="lr"):
        SoftMergeConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        SoftMergeConfig(steps=-1)
    with pytest.raises(ValueError, match="mirror_confidence"):
        SoftMergeConfig(mirror_confidence=-1.0)
    with pytest.raises(ValueError, match="mirror_specialist_ratio"):
        SoftMergeConfig(mirror_specialist_ratio=math.inf)
    with pytest.raises(ValueError, match="mirror_flipped_ratio"):
        SoftMergeConfig(mirror_flipped_ratio=-1.0)
    with pytest.raises(ValueError, match="mirror_trusted"):
        SoftMergeConfig(mirror_trusted=1.5)
    with pytest.raises(ValueError, match="merge_duplicates"):
        SoftMergeConfig(merge_duplicates="yes")


def _poisoned(global_state, honest, factor):
    if math.isinf(factor) or math.isnan(factor):
        return {k: torch.full_like(v, factor) if v.dtype.is_floating_point else v for k, v in honest.items()}
    return {k: global_state[k] + factor * (v - global_state[k]) for k, v in honest.items()}


@pytest.mark.parametrize("factors", [(1e3, 1e6, 1e30), (1e3, 1e3, 1e3), (1e6, 1e6, 1e6), (1e30, 1e30, 1e30),
                                     (float("inf"), float("nan"), 1e30)])
def test_extreme_candidates_get_zero_weight_and_the_merge_stays_accurate(honest_candidates, digits_task, factors):
    model, locals_ = honest_candidates
    global_state = model.state_dict()
    honest = locals_[:7]
    bad = [_poisoned(global_state, locals_[7 + i], f) for i, f in enumerate(factors)]
    labels = [f"h{i}" for i in range(7)] + ["bad0", "bad1", "bad2"]
    gate = digits_task.gate.tensors()
    x_test, y_test = digits_task.test.tensors()

    merged, report = soft_merge(model, honest + bad, gate, SoftMergeConfig(), labels=labels)
    honest_merged, _ = soft_merge(model, honest, gate, SoftMergeConfig(), labels=labels[:7])

    for u in range(len(report.units)):
        for k, label in enumerate(report.candidates):
            if label.startswith("bad"):
                assert report.weights[u][k] == 0.0 and report.gates[u][k] == 0.0, (label, report.units[u])
    assert all(torch.isfinite(t).all() for t in merged.values() if t.dtype.is_floating_point)
    assert all(math.isfinite(v) for row in report.log_alpha for v in row)
    assert math.isfinite(report.loss_after)
    _, accuracy = evaluate_state(model, merged, x_test, y_test)
    _, honest_accuracy = evaluate_state(model, honest_merged, x_test, y_test)
    # With zero weight on them, the bad candidates can only shift the honest gates' noise
    # and where learning stops: allow one standard error of a 360-example accuracy (~2 points).
    assert accuracy >= honest_accuracy - 0.02, (accuracy, honest_accuracy)
    assert report.weight_on(["bad0", "bad1", "bad2"]) == 0.0


def test_gate_learning_shuts_out_a_sign_flipped_model_by_gradient_alone(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    global_state = model.state_dict()
    flipped = _poisoned(global_state, locals_[9], -20.0)
    config = SoftMergeConfig(warm_start=False, steps=200)
    _, report = soft_merge(model, locals_[:5] + [flipped], digits_task.gate.tensors(), config,
                           labels=[f"h{i}" for i in range(5)] + ["flip"])
    assert report.steps > 0
    assert report.weight_on(["flip"]) < 0.02
    assert report.accuracy_after > 0.8


def test_merge_is_deterministic_for_a_seed(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    first, _ = soft_merge(model, locals_, digits_task.gate.tensors(), SoftMergeConfig(seed=3))
    second, _ = soft_merge(model, locals_, digits_task.gate.tensors(), SoftMergeConfig(seed=3))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_warm_start_ceiling_lets_gates_close_but_never_open_past_the_start():
    torch.manual_seed(0)
    net = BatchNormNet()
    inputs = torch.randn(96, 4)
    targets = (inputs[:, 0] + inputs[:, 1] > 0).long()
    candidates = [_perturbed(net, scale, seed) for seed, scale in enumerate([0.05, 0.3, 0.6, 1.0, 2.0])]
    learned = {}
    for ceiling in (False, True):
        config = SoftMergeConfig(steps=120, tolerance=0.0, warm_start_ceiling=ceiling)
        _, report = soft_merge(net, candidates, (inputs, targets), config, labels=list("abcde"))
        start = warm_start_log_alpha(report.candidate_losses, config)
        learned[ceiling] = torch.tensor(report.log_alpha) - start
    # Without the ceiling some gate opens past its start; with it none does, and gates still close.
    assert float(learned[False].max()) > 0.5
    assert float(learned[True].max()) <= 1e-6
    assert float(learned[True].min()) < -0.5


def _descent_step(net, inputs, targets, steps=20, lr=0.5):
    """keep + the update a few steps of gradient descent make: an honest client's reply."""
    model = nn.Linear(inputs.shape[1], 2)
    model.load_state_dict(net.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _linear_task_with_a_flip():
    """A linear model, 300 separable examples, an honest update that descends and its sign flip."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    inputs = torch.randn(300, 3)
    targets = (inputs[:, 0] - inputs[:, 1] > 0).long()
    keep = {k: v.detach().clone() for k, v in net.state_dict().items()}
    honest = _descent_step(net, inputs, targets)
    return net, inputs, targets, keep, honest, mirror_state(honest, keep)


def test_mirror_state_reflects_floating_tensors_through_the_keep_model():
    keep = {"w": torch.tensor([1.0, 2.0]), "count": torch.tensor(3)}
    candidate = {"w": torch.tensor([1.5, 0.0]), "count": torch.tensor(7)}
    mirrored = mirror_state(candidate, keep)
    assert torch.equal(mirrored["w"], torch.tensor([0.5, 4.0]))
    assert int(mirrored["count"]) == 7


def test_mirror_test_starts_updates_that_do_not_descend_closed():
    # The keep model is mediocre; an honest update descends, its sign flip ascends, and an
    # IPM-like reply (keep - 0.1 * honest update) barely moves. By own loss alone the IPM
    # reply is as good as the keep model and better than nothing, so it starts open; the
    # plain mirror test (z = 0) sees that neither it nor the flip descends, and starts both closed.
    net, inputs, targets, keep, honest, flipped = _linear_task_with_a_flip()
    damping = {k: keep[k] - 0.1 * (honest[k] - keep[k]) for k in keep}
    labels = ["honest", "flipped", "damping"]
    weights = {}
    for mirror in (False, True):
        config = SoftMergeConfig(units="model", steps=0, mirror_test=mirror, mirror_confidence=0.0,
                                 keep_mode="candidate")
        _, report = soft_merge(net, [honest, flipped, damping], (inputs, targets), config, labels=labels)
        weights[mirror] = dict(zip(report.candidates, report.weights[0]))
    assert weights[False]["damping"] > 0.2 and weights[False]["keep"] > 0.2
    assert weights[True]["honest"] == pytest.approx(1.0)
    assert weights[True]["flipped"] == weights[True]["damping"] == weights[True]["keep"] == 0.0


def test_mirror_test_bound_is_closed_for_a_non_finite_candidate_and_open_for_a_non_finite_mirror():
    config = SoftMergeConfig(mirror_test=True)
    bounds = mirror_log_alpha([math.inf, 0.5, 0.5, 0.5], [0.5, math.inf, 0.5, 0.7], config)
    assert float(bounds[0]) == LOG_ALPHA_MIN
    assert float(bounds[1]) == -LOG_ALPHA_MIN
    assert float(bounds[2]) == pytest.approx(LOG_ALPHA_CLOSED)
    assert float(bounds[3]) > float(bounds[2])


def test_mirror_statistics_are_the_reflection_s_loss_and_the_standard_error_of_the_differences():
    torch.manual_seed(1)
    net = nn.Linear(3, 2)
    inputs, targets = torch.randn(50, 3), torch.randint(0, 2, (50,))
    keep = {k: v.detach().clone() for k, v in net.state_dict().items()}
    candidate = _descent_step(net, inputs, targets, steps=3)
    mirror_loss, error = mirror_statistics(net, candidate, keep, inputs, targets, batch_size=16)

    def per_example(state):
        return nn.functional.cross_entropy(torch.func.functional_call(net, state, (inputs,)), targets,
                                           reduction="none").double()
    differences = per_example(candidate) - per_example(mirror_state(candidate, keep))
    assert mirror_loss == pytest.approx(float(per_example(mirror_state(candidate, keep)).mean()), rel=1e-6)
    assert error == pytest.approx(float(differences.std()) / math.sqrt(50), rel=1e-6)
    assert mirror_statistics(net, keep, keep, inputs, targets) == (
        pytest.approx(evaluate_state(net, keep, inputs, targets)[0]), 0.0)
    # Given the candidate's own per-example losses, it skips their pass and agrees, bit for bit
    # with the same chunking (16-example batches above sum in another order).
    assert mirror_statistics(net, candidate, keep, inputs, targets,
                             own_losses=per_example_losses(net, candidate, inputs, targets)) == (
        mirror_statistics(net, candidate, keep, inputs, targets))


def test_mirror_confidence_bounds_only_a_significant_ascent():
    config = SoftMergeConfig(mirror_test=True, mirror_confidence=2.0)
    # d = +0.05 with a standard error of 0.04 is noise; d = +0.10 is not; d = 0 (keep) never is.
    bounds = mirror_log_alpha([0.55, 0.60, 0.5, 0.4], [0.5, 0.5, 0.5, 0.5], config, [0.04, 0.04, 0.0, 0.04])
    assert float(bounds[0]) == -LOG_ALPHA_MIN and float(bounds[2]) == -LOG_ALPHA_MIN
    assert float(bounds[1]) == pytest.approx(LOG_ALPHA_CLOSED - 0.10 / config.mirror_temperature)
    assert float(bounds[3]) == -LOG_ALPHA_MIN
    # Without standard errors, or at z = 0, every candidate is bounded as before.
    plain = mirror_log_alpha([0.55, 0.60, 0.5, 0.4], [0.5, 0.5, 0.5, 0.5], SoftMergeConfig(mirror_test=True))
    assert all(float(b) < 0 for b in plain[:3]) and float(plain[3]) > float(plain[2])


def test_mirror_confidence_closes_the_flip_and_keeps_the_keep_candidate():
    net, inputs, targets, _, honest, flipped = _linear_task_with_a_flip()
    config = SoftMergeConfig(units="model", steps=0, mirror_test=True, mirror_confidence=2.0, keep_mode="candidate")
    _, report = soft_merge(net, [honest, flipped], (inputs, targets), config, labels=["honest", "flipped"])
    weights = dict(zip(report.candidates, report.weights[0]))
    assert weights["flipped"] == 0.0
    assert weights["honest"] > 0 and weights["keep"] > 0  # the plain mirror test closes keep (d = 0)


def test_best_class_gain_is_the_largest_drop_of_one_class_mean_loss():
    targets = torch.tensor([0, 0, 1, 1, 2])
    keep = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    losses = torch.tensor([0.2, 0.4, 1.5, 1.1, 0.9], dtype=torch.float64)
    assert best_class_gain(losses, keep, targets) == pytest.approx(-0.7)  # class 0: mean(0.2, 0.4) - 1
    assert best_class_gain(keep + 0.5, keep, targets) == pytest.approx(0.5)  # no class improves
    assert best_class_gain(torch.full((5,), math.inf, dtype=torch.float64), keep, targets) == math.inf


def test_a_specialist_lowers_one_class_ratio_times_more_than_its_mirror_lowers_any():
    assert is_specialist(-0.9, -0.3, 3.0) and not is_specialist(-0.8, -0.3, 3.0)
    assert is_specialist(-0.1, 0.2, 3.0)  # the mirror image improves no class
    assert not is_specialist(0.1, -0.3, 3.0) and not is_specialist(math.inf, -0.3, 3.0)
    assert not is_specialist(-0.9, -0.3, 0.0)  # off


def test_mirror_bound_spares_the_specialists_only():
    config = SoftMergeConfig(mirror_test=True, mirror_confidence=2.0)
    # Both ascend significantly (d = 0.10, two and a half standard errors); the second is a specialist.
    bounds = mirror_log_alpha([0.60, 0.60, math.inf], [0.5, 0.5, 0.5], config, [0.04, 0.04, 0.04],
                              [False, True, True])
    assert float(bounds[0]) == pytest.approx(LOG_ALPHA_CLOSED - 0.10 / config.mirror_temperature)
    assert float(bounds[1]) == -LOG_ALPHA_MIN
    assert float(bounds[2]) == LOG_ALPHA_MIN  # a non-finite loss stays closed


def _class_gains(model, state, keep, inputs, targets):
    """(own, mirror image's) best class gain of ``state`` against ``keep``, as the merge reads them."""
    keep_losses = per_example_losses(model, keep, inputs, targets)
    return tuple(best_class_gain(per_example_losses(model, candidate, inputs, targets), keep_losses, targets)
                 for candidate in (state, mirror_state(state, keep)))


def _one_class_model(keep):
    """A digits model trained from ``keep`` on one class (3) of partition 0's data."""
    from softmerge.simulations.tasks import ArraySet, build_model, load_partition, train_model

    data = load_partition("digits", 0, 10, seed=0)
    local = build_model("digits")
    local.load_state_dict(keep)
    train_model(local, ArraySet(data.x[data.y == 3], data.y[data.y == 3]), epochs=1, learning_rate=0.05,
                batch_size=16, seed=7)
    return {k: v.detach().clone() for k, v in local.state_dict().items()}


def test_mirror_specialists_open_a_one_class_update_and_keep_most_sign_flips_closed(honest_candidates, digits_task):
    # A client that trained on one class of its data: its update lowers that class's loss
    # a lot and raises the rest, so on the balanced gate split it ascends and the plain
    # mirror test closes it. Sign-flipped honest updates ascend too; the rule spares only
    # those whose own best class gain beats their mirror's (the honest original's) by the ratio.
    model, honest = honest_candidates
    keep = {k: v.detach().clone() for k, v in model.state_dict().items()}
    specialist = _one_class_model(keep)
    flipped = [mirror_state(state, keep) for state in honest]
    labels = ["specialist"] + [f"flipped-{k}" for k in range(len(flipped))]
    inputs, targets = digits_task.gate.tensors()
    ratio = 2.5  # the specialist lowers its class's loss 3.1 times as much as its mirror image lowers any

    def marked(state):
        return is_specialist(*_class_gains(model, state, keep, inputs, targets), ratio)
    weights = {}
    for value in (0.0, ratio):
        # No gate steps and no no-harm retry: the weights are the starts' alone.
        config = SoftMergeConfig(steps=0, mirror_specialist_ratio=value, keep_mode="candidate", harm_margin=0.0)
        _, report = soft_merge(model, [specialist] + flipped, (inputs, targets), config, labels=labels)
        weights[value] = dict(zip(report.candidates, report.weights[0]))
    assert weights[0.0]["specialist"] == 0.0 and weights[ratio]["specialist"] > 0.0
    closed = [k for k in range(len(flipped)) if weights[0.0][f"flipped-{k}"] == 0.0]
    spared = [k for k in closed if weights[ratio][f"flipped-{k}"] > 0.0]
    assert len(closed) >= 8
    assert spared == [k for k in closed if marked(flipped[k])]
    assert len(spared) <= 1


def test_a_flipped_update_is_one_whose_mirror_lowers_one_class_ratio_times_more_than_it_lowers_any():
    assert is_flipped(-0.3, -0.9, 3.0) and not is_flipped(-0.3, -0.8, 3.0)
    assert is_flipped(0.2, -0.1, 3.0)  # the candidate improves no class, its mirror image does
    assert not is_flipped(-0.3, 0.1, 3.0) and not is_flipped(-0.3, math.inf, 3.0)
    assert not is_flipped(-0.3, -0.9, 0.0)  # off


def test_mirror_bound_closes_a_flipped_candidate_whether_spared_or_not_significant():
    config = SoftMergeConfig(mirror_test=True, mirror_confidence=2.0)
    # The first descends (d = -0.05) and is spared (trusted), the second ascends by less
    # than two standard errors; both are marked flipped and start at or below closed.
    bounds = mirror_log_alpha([0.50, 0.55], [0.55, 0.50], config, [0.04, 0.04], [True, False], [True, True])
    assert float(bounds[0]) == pytest.approx(LOG_ALPHA_CLOSED)
    assert float(bounds[1]) == pytest.approx(LOG_ALPHA_CLOSED - 0.05 / config.mirror_temperature)
    unmarked = mirror_log_alpha([0.50, 0.55], [0.55, 0.50], config, [0.04, 0.04], [True, False])
    assert [float(b) for b in unmarked] == [-LOG_ALPHA_MIN, -LOG_ALPHA_MIN]


def test_mirror_flipped_closes_a_flipped_one_class_update_that_the_mirror_test_passes(honest_candidates,
                                                                                     digits_task):
    # The one-class client above ascends on the balanced gate split, so its sign-flipped
    # update descends and passes the mirror test. Its mirror image (the honest one-class
    # update) lowers class 3's loss 3.1 times as much as the flipped update lowers any
    # class's: the rule closes it. It also closes an honest client whose own mirror image
    # has the larger best class gain (one of these ten, at 2.96 times): that is the rule's cost.
    model, honest = honest_candidates
    keep = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flipped = mirror_state(_one_class_model(keep), keep)
    labels = [f"honest-{k}" for k in range(len(honest))] + ["flipped"]
    inputs, targets = digits_task.gate.tensors()
    ratio = 2.5

    def marked(state):
        return is_flipped(*_class_gains(model, state, keep, inputs, targets), ratio)
    weights = {}
    for value in (0.0, ratio):
        # No gate steps and no no-harm retry: the weights are the starts' alone.
        config = SoftMergeConfig(steps=0, mirror_flipped_ratio=value, keep_mode="candidate", harm_margin=0.0)
        _, report = soft_merge(model, honest + [flipped], (inputs, targets), config, labels=labels)
        weights[value] = dict(zip(report.candidates, report.weights[0]))
    assert marked(flipped) and weights[0.0]["flipped"] > 0.0 and weights[ratio]["flipped"] == 0.0
    newly_closed = [k for k in range(len(honest)) if weights[ratio][labels[k]] == 0.0 < weights[0.0][labels[k]]]
    assert newly_closed == [k for k in range(len(honest)) if marked(honest[k]) and weights[0.0][labels[k]] > 0.0]
    assert len(newly_closed) <= 1


def test_mirror_trusted_spares_clients_by_their_record(honest_candidates, digits_task):
    # The one-class client above ascends on the balanced gate split, as do sign-flipped
    # honest updates. With mirror_trusted, a record of being open (trust 0.9) spares it from
    # the mirror bound; clients with a record of being shut (0.1), or one just under the
    # threshold (0.65), are bounded as before. The trust bound itself is off here (strength
    # 0), so that only the mirror rule differs between the runs.
    model, honest = honest_candidates
    keep = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flipped = [mirror_state(state, keep) for state in honest]
    candidates = [_one_class_model(keep)] + flipped
    labels = ["specialist", "flipped-near-threshold"] + [f"flipped-{k}" for k in range(1, len(flipped))]
    trust = [0.9, 0.65] + [0.1] * (len(flipped) - 1)

    def start_weights(threshold, with_trust=True):
        config = SoftMergeConfig(steps=0, mirror_trusted=threshold, trust_strength=0.0, keep_mode="candidate",
                                 harm_margin=0.0)
        _, report = soft_merge(model, candidates, digits_task.gate.tensors(), config, labels=labels,
                               trust=trust if with_trust else None)
        return dict(zip(report.candidates, report.weights[0]))

    plain, trusted = start_weights(0.0), start_weights(0.7)
    assert plain["specialist"] == 0.0 and trusted["specialist"] > 0.0
    closed = [label for label in labels[1:] if plain[label] == 0.0]
    assert len(closed) >= 8 and "flipped-near-threshold" in closed
    assert all(trusted[label] == 0.0 for label in closed)
    # Without a record there is nothing to read: the plain test.
    assert start_weights(0.7, with_trust=False) == start_weights(0.0, with_trust=False)


def test_a_newcomer_is_spared_the_mirror_test_only_among_newcomers(honest_candidates, digits_task):
    # At mirror_trusted = 1/2 a client with no record sits at the threshold. Spared in a
    # round of newcomers alone (nobody can be told apart by record yet), it is tested once
    # anyone has a record, or an attacker would shed the test by re-registering each round.
    model, honest = honest_candidates
    keep = {k: v.detach().clone() for k, v in model.state_dict().items()}
    candidates = [_one_class_model(keep)] + [mirror_state(state, keep) for state in honest]
    labels = ["specialist"] + [f"flipped-{k}" for k in range(len(honest))]

    def specialist_weight(trust, recorded):
        config = SoftMergeConfig(steps=0, mirror_trusted=0.5, trust_strength=0.0, keep_mode="candidate",
                                 harm_margin=0.0)
        _, report = soft_merge(model, candidates, digits_task.gate.tensors(), config, labels=labels, trust=trust,
                               recorded=recorded)
        return dict(zip(report.candidates, report.weights[0]))["specialist"]

    others = len(honest)
    assert specialist_weight([0.5] * (1 + others), [False] * (1 + others)) > 0.0
    assert specialist_weight([0.5] + [0.1] * others, [False] + [True] * others) == 0.0
    # A record at the same trust is a record: spared.
    assert specialist_weight([0.5] + [0.1] * others, [True] * (1 + others)) > 0.0
    # Without flags every trust is read as a record (the behaviour before newcomers were told apart).
    assert specialist_weight([0.5] + [0.1] * others, None) > 0.0
    assert specialist_weight([0.5] + [0.1] * others, [np.True_] * (1 + others)) > 0.0
    # Anything but a flag is refused: "no" or a trust value would read as a record.
    for bad in ([True], ["no"] * (1 + others), [0.5] * (1 + others), True, "yes"):
        with pytest.raises(ValueError, match="recorded must hold one True or False per candidate"):
            specialist_weight([0.5] * (1 + others), bad)


def test_a_newcomer_identical_to_a_spared_client_shares_its_gate_and_its_sparing(honest_candidates, digits_task):
    # Identical replies are one candidate, so a newcomer resending a recorded client's reply
    # is judged as that client is; the copy cannot shut the original.
    model, honest = honest_candidates
    keep = {k: v.detach().clone() for k, v in model.state_dict().items()}
    specialist = _one_class_model(keep)
    candidates = [specialist, {k: v.clone() for k, v in specialist.items()}] + [mirror_state(s, keep) for s in honest]
    labels = ["specialist", "copy"] + [f"flipped-{k}" for k in range(len(honest))]
    config = SoftMergeConfig(steps=0, mirror_trusted=0.5, trust_strength=0.0, keep_mode="candidate", harm_margin=0.0)
    _, report = soft_merge(model, candidates, digits_task.gate.tensors(), config, labels=labels,
                           trust=[0.5, 0.5] + [0.1] * len(honest), recorded=[True, False] + [True] * len(honest))
    weights = dict(zip(report.candidates, report.weights[0]))
    assert weights["specialist"] == weights["copy"] > 0.0


def test_duplicate_groups_are_exact_and_the_first_named_leads_its_group():
    net = BatchNormNet()
    a, b = _perturbed(net, 0.1, 1), _perturbed(net, 0.1, 2)
    # Same sums as b, different weights: bucketed together, told apart exactly.
    swapped = {k: v.flip(0) if v.dtype.is_floating_point else v for k, v in b.items()}
    nudged = {k: v.clone() for k, v in a.items()}
    nudged["head.bias"][0] += 1e-6
    states = [a, b, {k: v.clone() for k, v in a.items()}, swapped, nudged, {k: v.clone() for k, v in b.items()}]
    assert duplicate_groups(states) == [[0, 2], [1, 5], [3], [4]]
    assert duplicate_groups(states, first=5) == [[0, 2], [5, 1], [3], [4]]
    assert duplicate_groups([a]) == [[0]]
    # The same arrays listed in another order are still a copy.
    reordered = dict(reversed(list({k: v.clone() for k, v in a.items()}.items())))
    assert duplicate_groups([a, b, reordered]) == [[0, 2], [1]]


def test_a_model_that_reads_token_ids_merges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(50, 8), nn.Linear(8, 3))
    tokens, labels = torch.randint(0, 50, (40, 5)), torch.arange(40) % 3
    candidates = [{k: v + 0.01 * (i + 1) for k, v in model.state_dict().items()} for i in range(3)]
    merged, report = soft_merge(model, candidates, (tokens, labels), SoftMergeConfig(steps=4, check_every=2))
    assert set(merged) == set(model.state_dict()) and len(report.candidates) == 4
    assert checked_split(model, (tokens, labels))[0] is tokens


def test_checked_split_widens_integer_labels_and_names_what_is_wrong():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    inputs = torch.randn(5, 3)
    checked_inputs, labels = checked_split(model, (inputs, torch.tensor([0, 1, 1, 0, 1], dtype=torch.int32)))
    assert checked_inputs is inputs and labels.dtype == torch.int64 and labels.tolist() == [0, 1, 1, 0, 1]
    with pytest.raises(ValueError, match="labels must be class indices"):
        checked_split(model, (inputs, torch.ones(5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="the model cannot run on the validation split's inputs"):
        checked_split(model, (inputs.long(), torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"the root split's labels must lie in \[0, 2\)"):
        checked_split(model, (inputs, torch.tensor([0, 1, 2, 0, 1])), "root")
    # Without the probe the model is not run, so labels out of its range pass.
    assert checked_split(model, (inputs, torch.tensor([0, 1, 2, 0, 1])), probe=False)[1].max() == 2
    # An empty split is refused: with nothing to judge by, every candidate, extreme or not, was averaged in.
    with pytest.raises(ValueError, match="split is empty"):
        checked_split(model, (inputs[:0], torch.zeros(0, dtype=torch.long)))


def test_identical_replies_share_one_gate_and_one_candidate_s_weight(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    gate = digits_task.gate.tensors()
    config = SoftMergeConfig(steps=30, seed=1)
    copies = [{k: v.clone() for k, v in locals_[3].items()} for _ in range(4)]
    labels = ["h0", "h1", "h2", "c0", "c1", "c2", "c3"]

    merged, report = soft_merge(model, locals_[:3] + copies, gate, config, labels=labels)
    once, once_report = soft_merge(model, locals_[:3] + copies[:1], gate, config, labels=labels[:4])

    # Four copies merge exactly as one candidate would, and split its weight four ways.
    assert all(torch.equal(merged[k], once[k]) for k in merged)
    assert report.duplicates == [["c0", "c1", "c2", "c3"]]
    for u in range(len(report.units)):
        assert report.gates[u][3:7] == [once_report.gates[u][3]] * 4
        for k in range(3, 7):
            assert report.weights[u][k] == pytest.approx(once_report.weights[u][3] / 4)
        assert sum(report.weights[u]) == pytest.approx(1.0)
    assert report.weight_on(["c0", "c1", "c2", "c3"]) == pytest.approx(once_report.weight_on(["c0"]))

    # Without the rule, the copies are four candidates and the merge is another.
    apart, apart_report = soft_merge(model, locals_[:3] + copies, gate,
                                     SoftMergeConfig(steps=30, seed=1, merge_duplicates=False), labels=labels)
    assert apart_report.duplicates == []
    assert not all(torch.equal(apart[k], merged[k]) for k in merged)


def test_identical_replies_are_scored_once(honest_candidates, digits_task, monkeypatch):
    from softmerge.aggregation import merge as merge_module
    model, locals_ = honest_candidates
    scored = []
    real = merge_module.per_example_losses
    monkeypatch.setattr(merge_module, "per_example_losses",
                        lambda net, state, *args, **kwargs: scored.append(state) or real(net, state, *args, **kwargs))
    copies = [{k: v.clone() for k, v in locals_[3].items()} for _ in range(4)]
    resent = {k: v.clone() for k, v in model.state_dict().items()}
    config = SoftMergeConfig(steps=0, mirror_test=True, mirror_confidence=2.0)
    _, report = soft_merge(model, locals_[:2] + copies + [resent], digits_task.gate.tensors(), config)
    # Three distinct client models: one own-loss and one mirror pass each. The copies count
    # once, and the resent global model is the keep candidate, whose loss is already known.
    assert len(scored) == 6
    assert report.candidate_losses[2:6] == [report.candidate_losses[2]] * 4
    assert report.candidate_losses[6] == report.candidate_losses[7] == report.loss_before


def test_a_resent_global_model_joins_the_keep_candidate(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    resent = {k: v.clone() for k, v in model.state_dict().items()}
    merged, report = soft_merge(model, locals_[:3] + [resent], digits_task.gate.tensors(), SoftMergeConfig(steps=20),
                                labels=["h0", "h1", "h2", "stale"])
    assert report.duplicates == [["keep", "stale"]]
    assert report.candidates == ["h0", "h1", "h2", "stale", "keep"]
    for row in report.weights:
        assert row[3] == pytest.approx(row[4])
    assert all(torch.isfinite(t).all() for t in merged.values() if t.dtype.is_floating_point)


def test_report_times_gate_learning_apart_from_the_whole_merge(honest_candidates, digits_task, monkeypatch):
    """On a clock that moves 7 s per gate learning and 3 s per scoring pass, and at no other time."""
    import softmerge.aggregation.merge as merge

    clock = [0.0]
    learn, score = merge._learn_gates, merge.per_example_losses

    def timed(advance, function):
        def run(*args, **kwargs):
            clock[0] += advance
            return function(*args, **kwargs)
        return run

    monkeypatch.setattr(merge.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(merge, "_learn_gates", timed(7.0, learn))
    monkeypatch.setattr(merge, "per_example_losses", timed(3.0, score))
    model, locals_ = honest_candidates
    _, learned = soft_merge(model, locals_[:4], digits_task.gate.tensors(), SoftMergeConfig(steps=20, tolerance=0.0))
    assert learned.steps == 20 * learned.attempts
    assert learned.gate_seconds == 7.0 * learned.attempts
    assert learned.seconds > learned.gate_seconds and (learned.seconds - learned.gate_seconds) % 3.0 == 0
    _, scored_only = soft_merge(model, locals_[:4], digits_task.gate.tensors(), SoftMergeConfig(steps=0))
    assert scored_only.steps == 0 and scored_only.gate_seconds == 7.0 * scored_only.attempts


def test_gate_learning_adam_is_torch_adam_step_for_step():
    """The functional fused Adam of the gate loop takes exactly torch.optim.Adam's steps."""
    from softmerge.aggregation.merge import _FusedAdam

    torch.manual_seed(0)
    ours = torch.randn(3, 5).requires_grad_()
    start = ours.detach().clone()
    theirs = start.clone().requires_grad_()
    adam, reference = _FusedAdam(ours, 0.1), torch.optim.Adam([theirs], lr=0.1)
    for _ in range(25):
        gradient = torch.randn(3, 5) * 10
        ours.grad, theirs.grad = gradient.clone(), gradient.clone()
        adam.step()
        reference.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.equal(ours.detach(), start)


@pytest.mark.parametrize("dataset, shape, count", [("fashion-mnist", (1, 28, 28), 300), ("digits", (64,), 200)])
def test_scoring_passes_in_chunks_give_the_losses_of_one_pass(dataset, shape, count):
    # The merge's own-loss and mirror passes run in chunks for speed (SCORING_CHUNK_VALUES);
    # the gates start from these losses, so chunking must not move them by a single bit.
    from softmerge.aggregation.merge import SCORING_CHUNK_VALUES
    from softmerge.simulations.tasks import build_model

    model = build_model(dataset)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand((count, *shape), generator=generator)
    targets = torch.randint(0, 10, (count,), generator=generator)
    state = _perturbed(model, 0.05, seed=1)
    whole = per_example_losses(model, state, inputs, targets, batch_size=count)
    chunked = per_example_losses(model, state, inputs, targets)
    assert whole.shape == (count,) and whole.dtype == torch.float64
    assert torch.equal(chunked, whole)
    if math.prod(shape) * count > SCORING_CHUNK_VALUES:
        # The image split really is chunked (else this test would prove nothing about chunks).
        assert SCORING_CHUNK_VALUES // math.prod(shape) < count
    for size in (64, 128):
        assert torch.equal(per_example_losses(model, state, inputs, targets, batch_size=size), whole)


def test_scoring_chunks_are_cut_evenly_and_never_below_the_minimum(monkeypatch):
    # Inputs too large for the value budget still go MIN_SCORING_CHUNK at a time (not one by
    # one), and the last chunk is never a sliver: slivers are where the losses' last bits move.
    from softmerge.aggregation import merge as merge_module
    from softmerge.simulations.tasks import build_model

    model = build_model("digits")
    sizes = []
    handle = model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.rand((200, 64), generator=generator), torch.randint(0, 10, (200,), generator=generator)
    whole = per_example_losses(model, model.state_dict(), inputs, targets, batch_size=200)
    monkeypatch.setattr(merge_module, "SCORING_CHUNK_VALUES", 100)  # under one example's 64 x 2
    sizes.clear()
    assert torch.equal(per_example_losses(model, model.state_dict(), inputs, targets), whole)
    assert sizes == [50, 50, 50, 50]  # four chunks of at most 64, evenly cut
    monkeypatch.setattr(merge_module, "SCORING_CHUNK_VALUES", 64 * 67)  # 67 a chunk: 200 = 67 + 67 + 66
    sizes.clear()
    assert torch.equal(per_example_losses(model, model.state_dict(), inputs, targets), whole)
    assert sizes == [67, 67, 66]
    handle.remove()
    assert per_example_losses(model, model.state_dict(), inputs[:0], targets[:0]).shape == (0,)


class AuxHeadNet(nn.Module):
    """A train-only auxiliary head (as Inception's): eval mode never reads ``aux``."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)

    def forward(self, x):
        hidden = torch.relu(self.fc1(x))
        return self.fc2(hidden) + (0.3 * self.aux(hidden) if self.training else 0)


class TiedAcrossLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.hidden = nn.Linear(4, 4)
        self.hidden.weight = self.embed.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(torch.relu(self.embed(x)))))


def _aux_federation():
    torch.manual_seed(0)
    model = AuxHeadNet()
    inputs, targets = torch.randn(120, 4), torch.randint(0, 3, (120,))
    keep = {k: v.detach().clone() for k, v in model.state_dict().items()}
    honest = [_perturbed(model, 0.05, seed) for seed in range(3)]
    return model, (inputs, targets), keep, honest


def test_loss_blind_parameters_are_the_ones_eval_mode_never_reads():
    from softmerge.aggregation.merge import loss_blind_parameters

    model, (inputs, targets), keep, _ = _aux_federation()
    model.eval()
    assert loss_blind_parameters(model, keep, inputs, targets) == ["aux.weight", "aux.bias"]
    # A tied tensor read through one of its names is read: neither alias is blind.
    tied = TiedAcrossLayers().eval()
    assert loss_blind_parameters(tied, tied.state_dict(), inputs, targets) == []


@pytest.mark.parametrize("units", ["model", "layer", "tensor"])
def test_an_extreme_value_where_the_gate_split_cannot_see_it_never_reaches_the_merge(units):
    """An honest copy with 1e30 in a train-only head passed every gate: the loss the gates read never used it."""
    model, split, keep, honest = _aux_federation()
    poisoned = {k: v.clone() for k, v in honest[0].items()}
    poisoned["aux.weight"] = torch.full_like(poisoned["aux.weight"], 1e30)
    merged, report = soft_merge(model, [*honest, poisoned], split, SoftMergeConfig(units=units, steps=20))
    assert report.blind_tensors == ["aux.weight", "aux.bias"]
    assert torch.equal(merged["aux.weight"], keep["aux.weight"]) and torch.equal(merged["aux.bias"], keep["aux.bias"])
    # What the gates can judge is still the clients' merge.
    assert not torch.equal(merged["fc1.weight"], keep["fc1.weight"])
    assert model.training  # the merge restores the caller's mode
    # The report describes what went out: the head's own unit is all the keep model's.
    aux_units = [u for u, name in enumerate(report.units) if name.startswith("aux")]
    assert bool(aux_units) == (units != "model")
    for u in aux_units:
        assert report.weights[u][-1] == 1.0 and sum(report.weights[u]) == 1.0
        assert report.units[u] in report.fallback_units


class DetachedTemperature(nn.Module):
    """A parameter the loss reads without a gradient path: autograd alone would call it blind."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.fc(x) * self.temperature.detach()


def test_a_parameter_read_without_a_gradient_keeps_the_clients_merge_and_the_report_stays_true():
    torch.manual_seed(0)
    model = DetachedTemperature()
    split = (torch.randn(80, 4), torch.randint(0, 3, (80,)))
    candidates = []
    for seed in range(3):
        state = _perturbed(model, 0.1, seed)
        state["temperature"] = torch.tensor([2.0 + seed])
        candidates.append(state)
    merged, report = soft_merge(model, candidates, split, SoftMergeConfig(steps=10, check_every=5))
    assert report.blind_tensors == []
    assert float(merged["temperature"]) != 1.0  # the clients' merge, which the gates' loss did read
    assert evaluate_state(model, merged, *split) == (report.loss_after, report.accuracy_after)


def test_the_mirror_image_keeps_the_keep_model_s_running_statistics():
    """Reflected, a running variance over twice the keep model's went below 0: a NaN mirror loss, no mirror test."""
    from softmerge.aggregation.merge import model_buffer_names

    torch.manual_seed(0)
    net = BatchNormNet().eval()
    keep = {k: v.detach().clone() for k, v in net.state_dict().items()}
    candidate = _perturbed(net, 0.1, 1)
    candidate["bn.running_var"] = 3.0 * keep["bn.running_var"]
    buffers = model_buffer_names(net)
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= buffers
    mirrored = mirror_state(candidate, keep, buffers)
    assert torch.equal(mirrored["bn.running_var"], keep["bn.running_var"])
    assert torch.allclose(mirrored["fc.weight"], 2 * keep["fc.weight"] - candidate["fc.weight"])
    inputs, targets = torch.randn(40, 4), torch.randint(0, 2, (40,))
    mirror_loss, error = mirror_statistics(net, candidate, keep, inputs, targets)
    assert math.isfinite(mirror_loss) and math.isfinite(error)


def test_tied_names_share_one_unit_and_one_merged_value():
    """In two layer units the aliases got two values; load_state_dict kept the last, not the model scored."""
    torch.manual_seed(0)
    model = TiedAcrossLayers()
    units = build_merge_units(model, "layer")
    unit_of = {name: unit.name for unit in units for name in unit.tensor_names}
    assert unit_of["embed.weight"] == unit_of["hidden.weight"] == "embed"
    assert sorted(name for unit in units for name in unit.tensor_names) == sorted(model.state_dict())
    keep = {k: v.detach().clone() for k, v in model.state_dict().items()}
    candidates = []
    for seed in range(3):
        state = _perturbed(model, 0.1, seed)
        state["hidden.weight"] = state["embed.weight"]
        candidates.append(state)
    split = (torch.randn(60, 4), torch.randint(0, 3, (60,)))
    # Each unit its own start, so the units' weights differ.
    start = torch.tensor([[3.0, -3.0, -3.0, -10.0], [-3.0, 3.0, -3.0, -10.0], [-3.0, -3.0, 3.0, -10.0]])
    merged, report = soft_merge(model, candidates, split, SoftMergeConfig(units="layer", steps=0, harm_margin=0),
                                keep=keep, initial_log_alpha=start)
    assert torch.equal(merged["embed.weight"], merged["hidden.weight"])
    model.load_state_dict(merged)
    assert evaluate_state(model, model.state_dict(), *split)[0] == pytest.approx(report.loss_after)


class Float64WithFloat32Buffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3).double()
        self.register_buffer("scale", torch.ones(4, dtype=torch.float32))

    def forward(self, x):
        return self.fc(x * self.scale.double())


class SharedMask(nn.Module):
    """Two blocks share one non-persistent buffer (a causal mask, a rotary cache): it is in no state dict."""

    def __init__(self):
        super().__init__()
        self.block1, self.block2 = nn.Linear(4, 4), nn.Linear(4, 3)
        mask = torch.ones(4)
        self.block1.register_buffer("mask", mask, persistent=False)
        self.block2.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        return self.block2(torch.relu(self.block1(x * self.block1.mask)))


@pytest.mark.parametrize("units", ["layer", "tensor", ["block1.*"]])
def test_a_shared_buffer_outside_the_state_dict_is_no_tie(units):
    model = SharedMask()
    built = build_merge_units(model, units)
    assert sorted(name for unit in built for name in unit.tensor_names) == sorted(model.state_dict())


def test_a_pattern_that_takes_only_aliases_of_an_earlier_unit_s_tensors_is_refused():
    with pytest.raises(ValueError, match="'hidden.weight' takes only names tied to tensors of an earlier unit"):
        build_merge_units(TiedAcrossLayers(), ["embed.*", "hidden.weight"])


def test_a_float64_model_with_a_float32_buffer_selects_its_candidate_bit_for_bit():
    """Stacked in float32 because of one buffer, the selected float64 weights came back rounded."""
    torch.manual_seed(0)
    model = Float64WithFloat32Buffer()
    # Each candidate below float32's resolution from the next: rounded, the selection would not be candidate 0's.
    candidates = [{k: v + 1e-12 * seed if v.dtype == torch.float64 else v
                   for k, v in _perturbed(model, 0.1, seed).items()} for seed in range(3)]
    split = (torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,)))
    start = torch.tensor([[3.0, -10.0, -10.0, -10.0]])
    merged, report = soft_merge(model, candidates, split, SoftMergeConfig(mode="select", steps=0, harm_margin=0),
                                initial_log_alpha=start)
    assert report.weights[0][0] == 1.0
    assert torch.equal(merged["fc.weight"], candidates[0]["fc.weight"])
    assert merged["scale"].dtype == torch.float32


@pytest.mark.parametrize("seed", [1.5, None, -1, 2**63, True])
def test_a_merge_seed_that_torch_cannot_take_is_refused_when_configured(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        SoftMergeConfig(seed=seed)
    assert SoftMergeConfig(seed=np.int64(3)).seed == 3


def test_a_candidate_of_the_other_byte_order_is_excluded_not_a_crash():
    torch.manual_seed(0)
    model = BatchNormNet()
    honest = _perturbed(model, 0.05, 0)
    swapped = {k: v.numpy().astype(v.numpy().dtype.newbyteorder(">")) for k, v in _perturbed(model, 0.05, 1).items()}
    merged, report = soft_merge(model, [honest, swapped], (torch.randn(20, 4), torch.randint(0, 2, (20,))),
                                SoftMergeConfig(steps=4, check_every=2))
    assert [exclusion.index for exclusion in report.excluded] == [1]
    assert "unsupported dtype" in report.excluded[0].reason


def test_a_start_of_the_wrong_shape_is_said_not_silently_replaced():
    model, split, _, honest = _aux_federation()
    with pytest.warns(UserWarning, match=r"initial_log_alpha has shape \(4,\), not \(units, gated candidates\)"):
        soft_merge(model, honest, split, SoftMergeConfig(steps=0), initial_log_alpha=torch.zeros(4))
