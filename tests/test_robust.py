"""FLTrust, centered clipping and geometric median: the formulas on hand-checkable inputs, and the strategies."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from scipy.optimize import minimize

from softmerge.aggregation.robust import (
    apply_update,
    centered_clipping,
    flatten_updates,
    fltrust,
    fltrust_server_model,
    fltrust_trust_scores,
    geometric_median,
    weighted_coordinate_median,
)
from softmerge.server.baselines import MAX_SERVER_EPOCHS, CenteredClipping, FLTrust, GeometricMedian

from flower_helpers import StubGrid, make_reply

pytestmark = pytest.mark.usefixtures("task_identity")


def _close(actual, expected, tol=1e-9):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------
# FLTrust
# ---------------------------------------------------------------------------------------


def test_fltrust_trust_scores_and_norm_scaling_by_hand():
    server = [3.0, 4.0]  # ||g0|| = 5
    updates = [
        [6.0, 8.0],    # cos = 1            -> TS 1,   rescaled to [3, 4]
        [0.0, 1.0],    # cos = 4/5          -> TS 0.8, rescaled to [0, 5]
        [-3.0, -4.0],  # cos = -1           -> TS 0 (ReLU)
    ]
    aggregate, trust = fltrust(updates, server)
    _close(trust, [1.0, 0.8, 0.0])
    # (1 * [3, 4] + 0.8 * [0, 5]) / (1 + 0.8) = [3, 8] / 1.8
    _close(aggregate, [3.0 / 1.8, 8.0 / 1.8])
    _close(fltrust_trust_scores(updates, server), trust)


def test_fltrust_scaling_a_client_changes_nothing_even_at_1e30():
    server = torch.tensor([3.0, 4.0])
    updates = torch.tensor([[6.0, 8.0], [0.0, 1.0]], dtype=torch.float64)
    reference, _ = fltrust(updates, server)
    for factor in (1e3, 1e6, 1e30, 1e-30):
        scaled = updates.clone()
        scaled[1] *= factor
        aggregate, trust = fltrust(scaled, server)
        _close(aggregate, reference)
        _close(trust, [1.0, 0.8])
    # No client, however large, moves the model further than the server's own update.
    huge = torch.tensor([[1e30, 1e30], [-1e30, 2e30]], dtype=torch.float64)
    aggregate, _ = fltrust(huge, server)
    assert float(aggregate.norm()) <= 5.0 + 1e-12


def test_fltrust_zero_norms_and_no_trust_give_a_zero_update_without_nan():
    # A zero update has no direction: cosine 0, so no trust, and no 0/0.
    aggregate, trust = fltrust([[0.0, 0.0], [1.0, 0.0]], [2.0, 0.0])
    _close(trust, [0.0, 1.0])
    _close(aggregate, [2.0, 0.0])
    # Every client against the server: keep the global model.
    aggregate, trust = fltrust([[-1.0, 0.0], [0.0, 1.0]], [1.0, 0.0])
    _close(trust, [0.0, 0.0])
    _close(aggregate, [0.0, 0.0])
    # The server did not move: nothing to trust.
    aggregate, trust = fltrust([[1.0, 2.0]], [0.0, 0.0])
    assert torch.isfinite(aggregate).all() and torch.equal(aggregate, torch.zeros(2, dtype=torch.float64))


def test_fltrust_rejects_non_finite_input_instead_of_returning_nan():
    with pytest.raises(ValueError, match="non-finite"):
        fltrust([[math.nan, 0.0]], [1.0, 0.0])
    with pytest.raises(ValueError, match="entries"):
        fltrust([[1.0, 0.0]], [1.0, 0.0, 0.0])


def test_fltrust_server_model_is_deterministic_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = (torch.randn(20, 3), torch.randint(0, 2, (20,)))
    first, loss = fltrust_server_model(model, before, data, epochs=2, learning_rate=0.1, batch_size=8, seed=5)
    rng_state = torch.get_rng_state()
    second, _ = fltrust_server_model(model, before, data, epochs=2, learning_rate=0.1, batch_size=8, seed=5)
    other, _ = fltrust_server_model(model, before, data, epochs=2, learning_rate=0.1, batch_size=8, seed=6)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert any(not torch.equal(first[k], before[k]) for k in first)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert math.isfinite(loss)


def test_fltrust_server_model_runs_exactly_the_given_steps_across_passes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = (torch.randn(20, 3), torch.randint(0, 2, (20,)))
    settings = dict(learning_rate=0.1, batch_size=8, seed=5)  # 3 batches a pass: 8, 8, 4

    def trained(**kwargs):
        return fltrust_server_model(model, start, data, **settings, **kwargs)[0]

    # Steps are counted across reshuffled passes: 6 steps are 2 epochs, bit for bit.
    assert all(torch.equal(a, b) for a, b in zip(trained(steps=6).values(), trained(epochs=2).values()))
    # 7 steps go one batch into a third pass, 5 stop one batch short of the second's end.
    seven, five = trained(steps=7), trained(steps=5)
    assert not any(torch.equal(seven[k], trained(epochs=2)[k]) for k in seven if k.endswith("weight"))
    assert not any(torch.equal(five[k], trained(epochs=2)[k]) for k in five if k.endswith("weight"))
    one_sgd_step = trained(steps=1)
    batch = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:8]
    manual = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    manual.load_state_dict(start)
    torch.nn.functional.cross_entropy(manual(data[0][batch]), data[1][batch]).backward()
    for name, parameter in manual.named_parameters():
        torch.testing.assert_close(one_sgd_step[name], start[name] - 0.1 * parameter.grad)
    with pytest.raises(ValueError, match="steps"):
        fltrust_server_model(model, start, data, steps=0)


# ---------------------------------------------------------------------------------------
# Centered clipping
# ---------------------------------------------------------------------------------------


def test_centered_clipping_one_iteration_by_hand():
    updates = [[3.0, 4.0], [0.0, 0.5]]
    aggregate, factors = centered_clipping(updates, tau=1.0, iterations=1)
    # From v = 0: ||[3, 4]|| = 5 > 1 is clipped to [0.6, 0.8]; ||[0, 0.5]|| = 0.5 is kept.
    # v = ([0.6, 0.8] + [0, 0.5]) / 2 = [0.3, 0.65]
    _close(factors, [0.2, 1.0])
    _close(aggregate, [0.3, 0.65])


def test_centered_clipping_iterates_from_the_new_center():
    # 1-D, tau = 1, v0 = 0, points 10, 0, 0.
    # L=1: clipped differences 1, 0, 0           -> v1 = 1/3
    # L=2: differences 29/3 -> 1, -1/3, -1/3     -> v2 = 1/3 + (1 - 2/3)/3 = 4/9
    updates = [[10.0], [0.0], [0.0]]
    _close(centered_clipping(updates, tau=1.0, iterations=1).aggregate, [1.0 / 3.0])
    aggregate, factors = centered_clipping(updates, tau=1.0, iterations=2)
    _close(aggregate, [4.0 / 9.0])
    _close(factors, [3.0 / 29.0, 1.0, 1.0])


def test_centered_clipping_reference_and_infinite_tau():
    updates = torch.tensor([[1.0, 2.0], [3.0, -2.0]], dtype=torch.float64)
    # Clients that agree with the reference do not move it.
    _close(centered_clipping([[1.0, 1.0], [1.0, 1.0]], reference=[1.0, 1.0], tau=0.1).aggregate, [1.0, 1.0])
    # Without clipping, one step from any reference lands on the mean.
    _close(centered_clipping(updates, reference=[100.0, -7.0], tau=math.inf).aggregate, [2.0, 0.0])
    # From reference [2, 0] with tau = 1: differences [-1, 2] (norm sqrt 5) and [1, -2] cancel.
    _close(centered_clipping(updates, reference=[2.0, 0.0], tau=1.0).aggregate, [2.0, 0.0])
    with pytest.raises(ValueError):
        centered_clipping(updates, tau=0.0)
    with pytest.raises(ValueError):
        centered_clipping(updates, iterations=0)


def test_centered_clipping_bounds_a_1e30_client():
    honest = [[0.1, 0.0], [0.0, 0.1], [0.1, 0.1]]
    aggregate, factors = centered_clipping(honest + [[1e30, 1e30]], tau=1.0, iterations=1)
    # Honest norms are below tau; the attacker's difference is clipped to the unit vector [1, 1]/sqrt 2.
    # v = ([0.2, 0.2] + [1, 1]/sqrt 2) / 4
    _close(aggregate, [(0.2 + 1 / math.sqrt(2)) / 4] * 2)
    _close(factors[:3], [1.0, 1.0, 1.0])
    assert 0 < float(factors[3]) < 1e-29
    # Duplicates and zeros: zero differences are not divided by.
    aggregate, factors = centered_clipping([[0.0, 0.0], [0.0, 0.0]], tau=1.0, iterations=3)
    assert torch.equal(aggregate, torch.zeros(2, dtype=torch.float64)) and torch.isfinite(factors).all()


# ---------------------------------------------------------------------------------------
# Geometric median
# ---------------------------------------------------------------------------------------


def test_geometric_median_of_symmetric_points_is_the_center():
    points = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]
    result = geometric_median(points)
    _close(result.median, [0.0, 0.0], tol=1e-12)
    assert result.converged
    _close(result.weights, [0.25] * 4)
    shifted = geometric_median(np.asarray(points) + [5.0, -3.0])
    _close(shifted.median, [5.0, -3.0], tol=1e-9)


def test_geometric_median_on_a_line_is_the_middle_point_and_follows_weights():
    # In 1-D the geometric median is the (weighted) median.
    result = geometric_median([[0.0], [1.0], [10.0]], max_iter=500, ftol=1e-12)
    _close(result.median, [1.0], tol=1e-5)
    # sum alpha_i |v - x_i| with alpha = (3, 1) is smallest at the heavier point.
    weighted = geometric_median([[0.0], [1.0]], weights=[3.0, 1.0], max_iter=500, ftol=1e-12)
    _close(weighted.median, [0.0], tol=1e-5)
    with pytest.raises(ValueError):
        geometric_median([[0.0], [1.0]], weights=[-1.0, 2.0])


def test_geometric_median_stays_with_the_cluster_despite_a_1e30_outlier():
    cluster = np.array([[0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.1], [0.1, 0.1, 0.1]])
    for scale in (1e3, 1e6, 1e30):
        result = geometric_median(np.vstack([cluster, [[scale, -scale, scale]]]))
        assert torch.isfinite(result.median).all()
        assert result.converged
        radius = np.linalg.norm(cluster - cluster.mean(0), axis=1).max()
        assert np.linalg.norm(result.median.numpy() - cluster.mean(0)) < radius
        assert float(result.weights[-1]) < 1e-2


def test_geometric_median_weights_rebuild_the_median_they_describe():
    # The reported weights are the shares that form the returned point (the last step's), a
    # convex combination of the points, with scaling undone.
    points = np.random.default_rng(3).normal(size=(7, 5)) * 1e4
    points[-1] *= 1e6
    result = geometric_median(points, weights=[1, 2, 1, 1, 3, 1, 1], max_iter=7)
    assert float(result.weights.sum()) == pytest.approx(1.0)
    assert bool((result.weights >= 0).all())
    _close(result.weights @ torch.as_tensor(points), result.median.tolist(), tol=1e-6 * float(result.median.norm()))


def test_geometric_median_is_not_fooled_by_a_start_on_a_data_point():
    cluster = np.random.default_rng(1).normal(scale=0.1, size=(6, 4))
    direction = np.array([0.5, -1.0, 2.0, 0.3])
    # Four of ten collinear at 1, 2, 3, 4 x 1e30: the weighted mean is, to float64
    # precision, exactly the first outlier, where the smoothed iteration stalls at once.
    points = np.vstack([cluster, 1e30 * np.outer([1.0, 2.0, 3.0, 4.0], direction)])
    result = geometric_median(points)
    assert result.converged
    radius = np.linalg.norm(cluster - cluster.mean(0), axis=1).max()
    assert np.linalg.norm(result.median.numpy() - cluster.mean(0)) < radius
    # Here the coordinate-wise median is the middle vertex (1, 0.1), but every angle of
    # the triangle is below 120 degrees, so the median is the inner Fermat point.
    triangle = np.array([[0.0, 0.0], [1.0, 0.1], [2.0, 5.0]])
    _close(weighted_coordinate_median(triangle), [1.0, 0.1])
    fermat = minimize(lambda v: np.linalg.norm(triangle - v, axis=1).sum(), triangle.mean(0), method="Nelder-Mead",
                      options={"xatol": 1e-10, "fatol": 1e-12}).x
    _close(geometric_median(triangle, ftol=1e-10, max_iter=500).median, fermat, tol=1e-5)


@pytest.mark.parametrize("shift", [0.0, 1000.0])
def test_geometric_median_leaves_a_data_point_that_is_not_the_median(shift):
    # Both starts (the mean and the coordinate-wise median) are data points here, and next to
    # one the smoothed iteration moves by about nu a step: far from the origin the stop rule
    # took that for convergence and returned the data point (999.0 against 999.06).
    points = np.array([[0.0, 0.0], [-1.0, 0.1], [-1.0, -0.1], [-1.0, 0.0], [3.0, 0.0]]) + shift

    def objective(v):
        return float(np.linalg.norm(points - v, axis=1).mean())

    best = minimize(objective, points.mean(0) + 0.3, method="Nelder-Mead",
                    options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    result = geometric_median(points, max_iter=500)  # the default stop, relative to ||v||
    assert result.converged
    assert objective(result.median.numpy()) <= best.fun + 1e-5
    _close(result.median, best.x, tol=1e-2)
    # A data point that is the median (Kuhn's condition holds there) is still where it stops.
    _close(geometric_median(np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) + shift).median,
           [shift, shift], tol=1e-6)


def test_geometric_median_weights_beyond_float64s_sum_still_weigh():
    # Their sum overflowed to inf, every share became 0 and the median nan.
    result = geometric_median([[0.0], [1.0], [0.5]], weights=[1e308, 1e308, 1.0], max_iter=500, ftol=1e-12)
    assert torch.isfinite(result.median).all() and 0.0 <= float(result.median[0]) <= 1.0
    _close(weighted_coordinate_median([[0.0], [1.0], [0.5]], [1e308, 1e308, 1.0]), [0.5])


def test_weighted_coordinate_median_by_hand():
    # Column 0 sorted: 0, 1, 5 -> 1.  Column 1 sorted: -2, 3, 4 -> 3.
    _close(weighted_coordinate_median([[0.0, 4.0], [1.0, -2.0], [5.0, 3.0]]), [1.0, 3.0])
    # Even count, equal weights: the mean of the middle two (cumulative weight exactly 1/2).
    _close(weighted_coordinate_median([[0.0], [1.0], [2.0], [10.0]]), [1.5])
    # Weights 3:1 put the median on the heavy point.
    _close(weighted_coordinate_median([[0.0], [1.0]], [3.0, 1.0]), [0.0])


def test_geometric_median_matches_scipy_on_a_random_case():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(6, 3))
    weights = rng.uniform(0.5, 2.0, size=6)
    alpha = weights / weights.sum()

    def objective(v):
        return float(alpha @ np.linalg.norm(points - v, axis=1))

    reference = minimize(objective, points.mean(0), method="Nelder-Mead",
                         options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    result = geometric_median(points, weights, max_iter=1000, ftol=1e-12)
    assert objective(result.median.numpy()) <= reference.fun + 1e-9
    _close(result.median, reference.x, tol=1e-4)


def test_geometric_median_of_duplicates_and_zeros_is_finite():
    result = geometric_median([[2.0, -1.0]] * 3)
    _close(result.median, [2.0, -1.0])
    assert result.iterations == 1 and result.converged
    zeros = geometric_median(np.zeros((4, 3)))
    assert torch.equal(zeros.median, torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(zeros.weights).all()
    # Two thirds of the weight on one point: that point is the median.
    mixed = geometric_median([[0.0, 0.0], [0.0, 0.0], [1e30, 0.0]])
    assert mixed.converged
    _close(mixed.median, [0.0, 0.0], tol=1e-5)
    with pytest.raises(ValueError, match="non-finite"):
        geometric_median([[math.inf, 0.0]])


def test_every_rule_stays_finite_near_the_float64_limit():
    points = torch.tensor([[1e300, -1e300], [-1e300, 1e300], [1e-300, 0.0]], dtype=torch.float64)
    assert torch.isfinite(geometric_median(points).median).all()
    assert torch.isfinite(centered_clipping(points, tau=1.0, iterations=3).aggregate).all()
    assert torch.isfinite(fltrust(points, [1.0, 1.0]).aggregate).all()


# ---------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------


def test_flatten_and_apply_update_round_trip_and_keep_integer_buffers():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    other = {k: (v + 1.5 if v.dtype.is_floating_point else v + 7) for k, v in reference.items()}
    names, updates = flatten_updates(reference, [other, reference])
    assert "1.num_batches_tracked" not in names and updates.shape == (2, 6 + 3 + 4 * 3)
    _close(updates[0], np.full(21, 1.5), tol=1e-6)  # float32 rounding of v + 1.5
    rebuilt = apply_update(reference, updates[0], names)
    assert all(rebuilt[k].dtype == reference[k].dtype for k in reference)
    assert all(torch.equal(rebuilt[k], other[k]) for k in names)
    assert torch.equal(rebuilt["1.num_batches_tracked"], reference["1.num_batches_tracked"])


# ---------------------------------------------------------------------------------------
# Strategies, fed hand-built reply messages
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def federation(digits_task):
    """A digits MLP and nine honest local models, one epoch each on a slice of the client pool.

    Lighter than conftest's ``honest_candidates`` (no flwr-datasets, no FedAvg warm-up),
    which keeps this file fast when it runs alone.
    """
    from softmerge.simulations.tasks import ArraySet, build_model, train_model

    model = build_model("digits", seed=0)
    pool = digits_task.pool
    locals_ = []
    for client, indices in enumerate(np.array_split(np.random.default_rng(0).permutation(len(pool)), 9)):
        local = build_model("digits")
        local.load_state_dict(model.state_dict())
        train_model(local, ArraySet(pool.x[indices], pool.y[indices]), epochs=1, learning_rate=0.1, batch_size=16,
                    seed=client)
        locals_.append({k: v.detach().clone() for k, v in local.state_dict().items()})
    return model, locals_


def _start_round(strategy, model, server_round=1):
    list(strategy.configure_train(server_round, ArrayRecord(model.state_dict()), ConfigRecord(),
                                  StubGrid(list(range(1, 11)))))


def _shifted(global_state, local_state, factor):
    """global + factor * (local - global): factor -1 is a sign flip, 1e30 an extreme value."""
    return {k: (g + factor * (local_state[k] - g)) if g.dtype.is_floating_point else g.clone()
            for k, g in global_state.items()}


def _update_of(arrays, global_state):
    state = arrays.to_torch_state_dict()
    return torch.cat([(state[k].double() - global_state[k].double()).reshape(-1) for k in global_state])


def _broken_replies(model, locals_):
    nan_state = {k: torch.full_like(v, math.nan) for k, v in locals_[0].items()}
    wrong_shape = dict(locals_[1])
    wrong_shape["fc1.weight"] = torch.zeros(3, 3)
    return [make_reply(20, error="client crashed"), make_reply(21, nan_state, partition=21),
            make_reply(22, locals_[2], extra_arrays=True), make_reply(23, wrong_shape, partition=23)]


def _assert_excluded_the_broken_replies(strategy, server_round):
    reasons = " ".join(e.reason for e in strategy.excluded[server_round])
    assert len(strategy.excluded[server_round]) == 4
    assert "client crashed" in reasons and "non-finite" in reasons and "one ArrayRecord" in reasons
    assert "shape" in reasons


def _assert_same_layout(arrays, model):
    merged = arrays.to_torch_state_dict()
    reference = model.state_dict()
    assert list(merged) == list(reference)
    assert all(merged[k].dtype == v.dtype and merged[k].shape == v.shape for k, v in reference.items())
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_fltrust_reads_integer_root_labels_of_any_width_and_refuses_a_root_set_it_cannot_train_on(digits_task):
    from softmerge.simulations.tasks import build_model

    model = build_model("digits", seed=0)
    inputs, labels = digits_task.gate.tensors()
    assert FLTrust(model, (inputs, labels.to(torch.int16))).root_data[1].dtype == torch.int64
    with pytest.raises(ValueError, match="the root split's inputs are torch.float64"):
        FLTrust(model, (inputs.double(), labels))
    with pytest.raises(ValueError, match="the root split is empty"):
        FLTrust(model, (inputs[:0], labels[:0]))


def test_fltrust_strategy_ignores_sign_flips_and_bounds_extreme_clients(federation, digits_task):
    model, locals_ = federation
    global_state = model.state_dict()
    strategy = FLTrust(model, digits_task.gate.tensors(), epochs=1, learning_rate=0.1, batch_size=16, seed=0)
    assert isinstance(strategy, FedAvg)
    _start_round(strategy, model, 2)
    replies = [make_reply(i + 1, locals_[i], partition=i) for i in range(5)]
    replies += [make_reply(6, _shifted(global_state, locals_[5], -1.0), partition=5),
                make_reply(7, _shifted(global_state, locals_[6], 1e30), partition=6)]
    replies += _broken_replies(model, locals_)

    arrays, metrics = strategy.aggregate_train(2, replies)

    _assert_same_layout(arrays, model)
    _assert_excluded_the_broken_replies(strategy, 2)
    scores = strategy.client_scores[2]
    assert scores["client-5"] == 0.0                      # sign flip: negative cosine -> no trust
    assert all(scores[f"client-{i}"] > 0 for i in range(5))
    assert scores["client-6"] > 0                         # 1e30 x an honest direction: trusted, but rescaled
    assert metrics["fltrust-clients"] == 7 and metrics["fltrust-excluded"] == 4
    assert metrics["fltrust-trusted"] == sum(1 for s in scores.values() if s > 0) == 6
    # Every update is rescaled to ||g0||, so the step is no longer than the server's own.
    step = float(_update_of(arrays, global_state).norm())
    assert 0 < step <= metrics["fltrust-server-update-norm"] * (1 + 1e-5)
    assert metrics["train-loss"] == pytest.approx(0.5) and "partition-id" not in metrics

    again, _ = strategy.aggregate_train(2, list(reversed(replies)))
    assert all(torch.equal(a, b) for a, b in zip(arrays.to_torch_state_dict().values(),
                                                 again.to_torch_state_dict().values()))


def test_centered_clipping_strategy_bounds_the_step_and_starts_from_the_previous_update(federation):
    model, locals_ = federation
    global_state = model.state_dict()
    tau = 0.05
    strategy = CenteredClipping(tau=tau, iterations=2)
    _start_round(strategy, model)
    replies = [make_reply(i + 1, locals_[i], partition=i) for i in range(5)]
    replies += [make_reply(6, _shifted(global_state, locals_[6], 1e30), partition=6)] + _broken_replies(model, locals_)

    arrays, metrics = strategy.aggregate_train(1, replies)

    _assert_same_layout(arrays, model)
    _assert_excluded_the_broken_replies(strategy, 1)
    first = _update_of(arrays, global_state)
    # Each iteration moves the center by a mean of vectors no longer than tau.
    assert float(first.norm()) <= 2 * tau * (1 + 1e-5)
    assert metrics["cclip-clients"] == 6 and metrics["cclip-clipped"] >= 1
    assert strategy.client_scores[1]["client-6"] < 1e-20

    # Round 2: every client sends 1.5 x the applied update. From the previous update the
    # difference 0.5 * first has norm <= tau, so nothing is clipped and v lands on 1.5 * first.
    second_model = type(model)()
    second_model.load_state_dict(arrays.to_torch_state_dict())
    second_global = second_model.state_dict()
    _start_round(strategy, second_model, 2)
    target = apply_update(second_global, 1.5 * strategy.applied_update)
    arrays2, metrics2 = strategy.aggregate_train(2, [make_reply(i + 1, target, partition=i) for i in range(3)])
    assert metrics2["cclip-clipped"] == 0
    _close(_update_of(arrays2, second_global), 1.5 * first, tol=1e-5)


def test_centered_clipping_from_zero_clips_what_previous_would_not(federation):
    model, locals_ = federation
    global_state = model.state_dict()
    strategy = CenteredClipping(tau=0.05, iterations=1, reference="zero")
    _start_round(strategy, model)
    update = _update_of(ArrayRecord(locals_[0]), global_state)
    target = apply_update(global_state, update * (0.08 / float(update.norm())))
    arrays, metrics = strategy.aggregate_train(1, [make_reply(1, target), make_reply(2, target)])
    assert metrics["cclip-clipped"] == 2
    assert float(_update_of(arrays, global_state).norm()) == pytest.approx(0.05, rel=1e-4)


def test_geometric_median_strategy_weighs_each_reply_by_its_examples(federation):
    # Three updates on one line, at 0, 1 and 10 times one direction: the geometric median is
    # the weighted 1-D median, the middle one with equal counts and the heavy one with 1, 1, 5.
    model, locals_ = federation
    global_state = model.state_dict()
    states = [_shifted(global_state, locals_[0], factor) for factor in (0.0, 1.0, 10.0)]
    direction = _update_of(ArrayRecord(locals_[0]), global_state)
    for counts, expected in (((100, 100, 100), 1.0), ((100, 100, 500), 10.0)):
        strategy = GeometricMedian(max_iter=1000, ftol=1e-12)
        _start_round(strategy, model)
        arrays, _ = strategy.aggregate_train(1, [make_reply(i + 1, state, partition=i, num_examples=n)
                                                 for i, (state, n) in enumerate(zip(states, counts))])
        _close(_update_of(arrays, global_state), (expected * direction).tolist(), tol=1e-4)


def test_geometric_median_strategy_stays_with_the_honest_clients(federation):
    model, locals_ = federation
    global_state = model.state_dict()
    strategy = GeometricMedian()
    _start_round(strategy, model)
    replies = [make_reply(i + 1, locals_[i], partition=i) for i in range(6)]
    replies += [make_reply(7, _shifted(global_state, locals_[6], 1e30), partition=6),
                make_reply(8, _shifted(global_state, locals_[7], 1e6), partition=7),
                make_reply(9, locals_[8], partition=8, num_examples=-5)]
    replies += _broken_replies(model, locals_)

    arrays, metrics = strategy.aggregate_train(1, replies)

    _assert_same_layout(arrays, model)
    assert metrics["geomed-clients"] == 8 and metrics["geomed-excluded"] == 5 and metrics["geomed-converged"] == 1
    assert any("num-examples" in e.reason for e in strategy.excluded[1])
    honest = torch.stack([_update_of(ArrayRecord(locals_[i]), global_state) for i in range(6)])
    spread = float((honest - honest.mean(0)).norm(dim=1).max())
    assert float((_update_of(arrays, global_state) - honest.mean(0)).norm()) < spread
    scores = strategy.client_scores[1]
    assert scores["client-6"] < 1e-20 and scores["client-7"] < 1e-3
    assert sum(scores.values()) == pytest.approx(1.0)

    # An absurd num-examples makes a reply malformed whatever the rule does with weights.
    unweighted = GeometricMedian(weighted=False)
    _start_round(unweighted, model)
    _, metrics = unweighted.aggregate_train(1, replies)
    assert metrics["geomed-clients"] == 8


@pytest.mark.parametrize("make", [
    lambda model, task: FLTrust(model, task.gate.tensors()),
    lambda model, task: CenteredClipping(),
    lambda model, task: GeometricMedian(),
], ids=["fltrust", "cclip", "geomed"])
def test_a_round_without_valid_replies_keeps_the_global_model(make, federation, digits_task):
    model, locals_ = federation
    strategy = make(model, digits_task)
    assert strategy.aggregate_train(1, [make_reply(1, locals_[0])]) == (None, None)  # never configured
    _start_round(strategy, model)
    arrays, metrics = strategy.aggregate_train(1, _broken_replies(model, locals_))
    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert metrics[f"{strategy.metric_prefix}-clients"] == 0
    assert metrics[f"{strategy.metric_prefix}-excluded"] == 4


def test_fltrust_server_takes_the_median_client_s_steps(federation, digits_task):
    model, locals_ = federation
    root_size = len(digits_task.gate.tensors()[1])

    from softmerge.aggregation.robust import server_steps_per_epoch

    def server_steps(counts, match_client_steps=True, batch_size=16, **settings):
        strategy = FLTrust(model, digits_task.gate.tensors(), batch_size=batch_size, seed=0,
                           match_client_steps=match_client_steps, **settings)
        _start_round(strategy, model)
        replies = [make_reply(i + 1, locals_[i], partition=i, num_examples=n) for i, n in enumerate(counts)]
        return strategy.aggregate_train(1, replies)[1]["fltrust-server-steps"]

    # Median 160 examples: 10 steps of 16 a client epoch; the lying minority moves nothing.
    assert server_steps([150, 1, 160, 10**8, 170]) == 10
    assert server_steps([150, 160, 170], epochs=2) == 20
    # A median of 10^8 examples is capped at MAX_SERVER_EPOCHS passes over the root set, a pass
    # counted as the server takes it (a one-example remainder batch is skipped).
    assert server_steps([10**8] * 3) == MAX_SERVER_EPOCHS * server_steps_per_epoch(root_size, 16)
    assert server_steps([10**8] * 3, batch_size=root_size - 1) == MAX_SERVER_EPOCHS
    # Off, the default: one pass over the root set.
    assert server_steps([150, 160, 170], match_client_steps=False) == math.ceil(root_size / 16)
    assert FLTrust(model, digits_task.gate.tensors()).match_client_steps is False


def test_fltrust_keeps_the_global_model_when_every_client_opposes_the_server(federation, digits_task):
    model, locals_ = federation
    global_state = model.state_dict()
    strategy = FLTrust(model, digits_task.gate.tensors(), epochs=2)
    _start_round(strategy, model)
    flipped = [make_reply(i + 1, _shifted(global_state, locals_[i], -1.0), partition=i) for i in range(4)]
    arrays, metrics = strategy.aggregate_train(1, flipped)
    merged = arrays.to_torch_state_dict()
    assert metrics["fltrust-trusted"] == 0
    assert all(torch.equal(merged[k], v) for k, v in global_state.items())


def test_strategy_constructors_reject_bad_settings(federation, digits_task):
    model, _ = federation
    with pytest.raises(ValueError):
        FLTrust(model, (torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError):
        FLTrust(model, digits_task.gate.tensors(), learning_rate=0.0)
    with pytest.raises(ValueError):
        CenteredClipping(tau=-1.0)
    with pytest.raises(ValueError):
        CenteredClipping(reference="median")
    with pytest.raises(ValueError):
        GeometricMedian(nu=0.0)


def test_median_statistics_take_each_coordinate_from_some_client():
    from softmerge.aggregation.robust import median_statistics

    reference = {"var": torch.ones(3), "weight": torch.zeros(2)}
    states = [{"var": torch.tensor([0.1, 5.0, 0.2])}, {"var": torch.tensor([0.3, 0.4, -1e30])},
              {"var": torch.tensor([0.2, 0.5, 0.3])}, {"var": torch.tensor([9.0, 0.6, 0.25])}]
    merged = median_statistics(reference, states, ["var"])
    # The lower median of four: the second smallest value in each coordinate.
    assert torch.equal(merged["var"], torch.tensor([0.2, 0.5, 0.2]))
    assert merged["var"].dtype == torch.float32 and set(merged) == {"var"}
    assert torch.equal(median_statistics(reference, [], ["var"])["var"], reference["var"])


@pytest.mark.parametrize(("examples", "batch", "steps"), [(300, 32, 10), (33, 32, 1), (34, 32, 2), (1, 32, 1),
                                                         (64, 32, 2), (5, 1, 5), (3, 2, 1)])
def test_server_steps_per_epoch_counts_the_batches_the_server_model_trains_on(examples, batch, steps):
    from softmerge.aggregation.robust import fltrust_server_model, server_steps_per_epoch

    assert server_steps_per_epoch(examples, batch) == steps
    model = torch.nn.Linear(2, 2)
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    data = (torch.randn(examples, 2, generator=torch.Generator().manual_seed(0)), torch.arange(examples) % 2)
    fltrust_server_model(model, model.state_dict(), data, epochs=1, batch_size=batch)
    assert len(calls) == steps
