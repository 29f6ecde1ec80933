"""Robust aggregation rules that Flower does not ship: FLTrust, centered clipping, geometric median.

Every rule works on *updates*: a (K, d) matrix whose row i is client i's model minus
the current global model, flattened over the floating-point tensors of the state dict
(:func:`flatten_updates` builds it, :func:`apply_update` adds the aggregate back). The
caller rejects non-finite or mismatched models first (see
:mod:`softmerge.aggregation.candidates`); these functions raise ``ValueError`` on
non-finite input rather than return NaN.

FLTrust (Cao, Fang, Liu & Gong, NDSS 2021, "FLTrust: Byzantine-robust Federated
Learning via Trust Bootstrapping"). The server trains the global model on a small clean
root set to get its own update g_0, then

    TS_i  = ReLU(cos(g_i, g_0))
    g_i'  = g_i * ||g_0|| / ||g_i||
    g     = sum_i TS_i g_i' / sum_i TS_i          (g = 0 when every TS_i is 0).

Centered clipping (Karimireddy, He & Jaggi, ICML 2021, "Learning from History for
Byzantine Robust Optimization"). From a reference v (the previous aggregate, or 0),
iterate L times

    v <- v + (1/K) sum_i (x_i - v) * min(1, tau / ||x_i - v||).

Geometric median by smoothed Weiszfeld (RFA: Pillutla, Kakade & Harchaoui, IEEE TSP
2022, "Robust Aggregation for Federated Learning"). With weights alpha_i (normalised to
sum 1) and smoothing nu, iterate

    beta_i = alpha_i / max(nu, ||x_i - v||),    v <- sum_i beta_i x_i / sum_i beta_i

until the step is small relative to ||v|| or ``max_iter`` is reached (from two starts,
see :func:`geometric_median`).

Numerics. Norms of float32 updates scaled by 1e30 still fit in float64, but a sum of
squares of larger float64 values does not, so every rule first divides its inputs by
powers of two near their largest magnitude (one for all of them; FLTrust one per update
and one for g_0), which is exact in binary floating point, works in float64, and
multiplies the result back. Each result is a convex combination of the
inputs (geometric median), a sum of steps of length at most tau (centered clipping) or
a vector of norm at most ||g_0|| (FLTrust), so finite inputs give finite outputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

ArrayLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]]


class FLTrustResult(NamedTuple):
    """The FLTrust aggregate update and each client's trust score TS_i in [0, 1]."""

    aggregate: torch.Tensor
    trust_scores: torch.Tensor


class CenteredClippingResult(NamedTuple):
    """The centered-clipping aggregate and each client's factor min(1, tau/||x_i - v||) in the last iteration."""

    aggregate: torch.Tensor
    clip_factors: torch.Tensor


class GeometricMedianResult(NamedTuple):
    """The smoothed geometric median, each point's weight in it, and how the iteration ended.

    ``weights`` are the last Weiszfeld step's shares, so ``median == weights @ points``
    exactly: they come from the distances to the iterate before the median, not to the
    median itself (the two differ by at most the stopping tolerance).
    """

    median: torch.Tensor
    weights: torch.Tensor
    iterations: int
    converged: bool


# ---------------------------------------------------------------------------------------
# State dicts <-> update matrices
# ---------------------------------------------------------------------------------------


def floating_names(reference: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors, in state-dict order: the coordinates an update has."""
    return [name for name, tensor in reference.items() if tensor.dtype.is_floating_point]


def flatten_state(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """The tensors ``names`` of ``state`` as one float64 vector."""
    if not names:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([torch.as_tensor(state[name]).detach().reshape(-1).to(torch.float64) for name in names])


def flatten_updates(
    reference: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Updates (state - reference) of the floating-point tensors as a (K, d) float64 matrix.

    Integer tensors (BatchNorm's batch counter) have no meaningful update and are left
    out; :func:`apply_update` copies them from the reference. ``names`` narrows the
    tensors further (default: every floating tensor).
    """
    names = floating_names(reference) if names is None else list(names)
    base = flatten_state(reference, names)
    rows = [flatten_state(state, names) - base for state in states]
    return names, torch.stack(rows) if rows else torch.zeros(0, base.numel(), dtype=torch.float64)


def median_statistics(
    reference: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """The coordinate-wise (lower) median of the clients' running statistics ``names``.

    Running statistics (BatchNorm's mean and variance) are not trained parameters, and a
    rule that rescales or extrapolates updates (FLTrust's norm scaling, centered clipping's
    carried-over reference) can move them where no client put them: a variance below 0
    makes every output NaN while every tensor is finite. The lower median is some client's
    value in each coordinate, so the result stays within the clients' range (a variance
    stays >= 0) and a malicious minority cannot move it out of the honest clients'. With
    no state the reference's values are kept.
    """
    result = {}
    for name in names:
        tensor = reference[name]
        if not states:
            result[name] = tensor.detach().clone()
            continue
        stacked = torch.stack([torch.as_tensor(state[name]).detach().to(torch.float64) for state in states])
        result[name] = stacked.median(dim=0).values.to(tensor.dtype)
    return result


def apply_update(
    reference: Mapping[str, torch.Tensor],
    update: torch.Tensor,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``reference + update`` as a state dict with the reference's names, shapes and dtypes.

    The sum is taken in float64 and then cast, so it can overflow a narrower dtype; the
    caller checks the result is finite.
    """
    names = list(names) if names is not None else floating_names(reference)
    expected = sum(reference[name].numel() for name in names)
    if update.numel() != expected:
        raise ValueError(f"update has {update.numel()} coordinates, the reference's floating tensors {expected}")
    update = update.reshape(-1).to(torch.float64)
    result = {name: tensor.detach().clone() for name, tensor in reference.items()}
    offset = 0
    for name in names:
        tensor = reference[name]
        piece = update[offset:offset + tensor.numel()].view(tensor.shape)
        result[name] = (tensor.detach().to(torch.float64) + piece).to(tensor.dtype)
        offset += tensor.numel()
    return result


# ---------------------------------------------------------------------------------------
# FLTrust
# ---------------------------------------------------------------------------------------


def fltrust_trust_scores(updates: ArrayLike, server_update: ArrayLike) -> torch.Tensor:
    """TS_i = ReLU(cos(g_i, g_0)); a zero-norm g_i or g_0 has cosine 0."""
    matrix = _as_matrix(updates, "updates")
    server = _as_vector(server_update, matrix.shape[1], "server_update")
    return _trust_scores(_unit_rows(matrix), server)


def fltrust(updates: ArrayLike, server_update: ArrayLike) -> FLTrustResult:
    """FLTrust aggregate of client updates (K, d) given the server's root-data update g_0 (d,).

    Every client update is rescaled to ||g_0|| and weighted by its trust score, so no
    client can move the model further than the server's own update does. If no client
    has positive trust (or g_0 is 0) the aggregate is 0: the global model is kept.
    """
    matrix = _as_matrix(updates, "updates")
    server = _as_vector(server_update, matrix.shape[1], "server_update")
    client_units = _unit_rows(matrix)
    trust = _trust_scores(client_units, server)
    scale = _power_of_two_scale(server)
    server_norm_scaled = float(torch.linalg.vector_norm(server / scale))
    total = float(trust.sum())
    if total <= 0.0 or server_norm_scaled == 0.0:
        return FLTrustResult(torch.zeros(matrix.shape[1], dtype=torch.float64), trust)
    # g_i' / ||g_0|| is the unit vector of g_i; combine those, then restore ||g_0||.
    direction = (trust / total) @ client_units
    return FLTrustResult(direction * server_norm_scaled * scale, trust)


def server_steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """SGD steps of one pass of :func:`fltrust_server_model` over ``num_examples``.

    A one-example remainder batch is skipped (it breaks BatchNorm in training mode) unless
    it is the only batch.
    """
    full, remainder = divmod(num_examples, batch_size)
    return full + (1 if remainder >= 2 or (remainder == 1 and full == 0) else 0)


def fltrust_server_model(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    root_data: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int = 1,
    learning_rate: float = 0.1,
    batch_size: int = 16,
    momentum: float = 0.0,
    seed: int = 0,
    steps: int | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Train a copy of ``model`` from ``global_state`` on the clean root set; FLTrust's g_0 is its update.

    SGD on mean cross-entropy, shuffled by ``seed``; the global random state is left
    untouched and dropout-like layers draw from ``seed`` too, so the result depends on
    the inputs only. ``model`` itself is not modified. ``steps``, if given, replaces
    ``epochs``: exactly that many SGD iterations, reshuffling the root set at each pass,
    as the paper's server runs the clients' R local iterations however small its root set
    is. Returns the trained state and the mean training loss of the last pass, which may
    be partial (NaN if no step was taken).
    """
    if steps is not None and not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1 or None, got {steps!r}")
    inputs, targets = root_data
    trained = copy.deepcopy(model)
    trained.load_state_dict(dict(global_state))
    trained.train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=learning_rate, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    last_loss = math.nan
    remaining = steps if steps is not None else math.inf
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs if steps is None else steps):
            if remaining <= 0:
                break
            order = torch.randperm(len(targets), generator=generator)
            total, count = 0.0, 0
            for start in range(0, len(targets), batch_size):
                if remaining <= 0:
                    break
                batch = order[start:start + batch_size]
                if len(batch) < min(2, batch_size) and count > 0:
                    # A one-example remainder breaks BatchNorm in training mode; at batch size 1
                    # every batch is one example and none is a remainder.
                    continue
                remaining -= 1
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(trained(inputs[batch]), targets[batch])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                count += len(batch)
            if count:
                last_loss = total / count
    return {name: tensor.detach().clone() for name, tensor in trained.state_dict().items()}, last_loss


# ---------------------------------------------------------------------------------------
# Centered clipping
# ---------------------------------------------------------------------------------------


def centered_clipping(
    updates: ArrayLike,
    reference: ArrayLike | None = None,
    tau: float = 1.0,
    iterations: int = 1,
) -> CenteredClippingResult:
    """Centered clipping of updates (K, d) around ``reference`` (default 0), ``iterations`` times.

    Each iteration moves v by the mean of the clipped differences, so every client moves
    the aggregate by at most tau / K per iteration however large its update is. ``tau``
    is in the units of the updates (an L2 norm); ``tau = inf`` gives the plain mean.
    """
    matrix = _as_matrix(updates, "updates")
    if not (isinstance(tau, (int, float)) and tau > 0 and not math.isnan(tau)):
        raise ValueError(f"tau must be a number > 0, got {tau!r}")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    start = (torch.zeros(matrix.shape[1], dtype=torch.float64) if reference is None
             else _as_vector(reference, matrix.shape[1], "reference"))
    scale = _power_of_two_scale(matrix, start)
    points, center, radius = matrix / scale, start / scale, tau / scale
    factors = torch.ones(matrix.shape[0], dtype=torch.float64)
    for _ in range(iterations):
        differences = points - center
        distances = torch.linalg.vector_norm(differences, dim=1)
        # Where distance <= radius the factor is 1; the clamp only avoids dividing by 0.
        factors = torch.where(distances > radius, radius / distances.clamp_min(torch.finfo(torch.float64).tiny),
                              torch.ones_like(distances))
        center = center + (differences * factors.unsqueeze(1)).mean(dim=0)
    return CenteredClippingResult(center * scale, factors)


# ---------------------------------------------------------------------------------------
# Geometric median (RFA)
# ---------------------------------------------------------------------------------------


def geometric_median(
    points: ArrayLike,
    weights: ArrayLike | None = None,
    nu: float = 1e-6,
    max_iter: int = 100,
    ftol: float = 1e-6,
) -> GeometricMedianResult:
    """Weighted geometric median of points (K, d) by RFA's smoothed Weiszfeld iteration.

    Minimises sum_i alpha_i ||x_i - v|| (distances below ``nu`` count as ``nu`` in the
    weights): the point nearest to most of the weight, which a minority of far outliers
    cannot drag away. ``weights`` default to equal; they need not sum to 1. ``nu`` is in
    the units of the points.

    Two departures from RFA's loop, both for far outliers:

    - RFA starts from the weighted mean, which a far minority drags far from the
      cluster: Weiszfeld then closes in by a roughly constant factor per step, and where
      the mean lands on a data point (collinear outliers at 1e30 put it on one to
      float64 precision) the smoothed iteration stalls there at once. So the iteration
      runs from the weighted mean and from the weighted coordinate-wise median (which a
      minority cannot drag far), and the end point with the smaller objective is
      returned, compared without cancellation. The coordinate-wise start alone is no
      cure: it is a data point in one dimension and often for few points, and stalls
      there too.
    - It stops when ||v_new - v|| <= ftol * max(||v_new||, nu). RFA stops on the
      relative change of the objective, but with a point at 1e30 the objective is
      dominated by that point's distance and stalls while v is still far from the
      cluster.

    ``iterations`` and ``converged`` describe the run that was returned.
    """
    matrix = _as_matrix(points, "points")
    count = matrix.shape[0]
    if weights is None:
        alpha = torch.full((count,), 1.0 / count, dtype=torch.float64)
    else:
        alpha = _as_vector(weights, count, "weights")
        if bool((alpha < 0).any()) or float(alpha.sum()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        alpha = _normalised(alpha)
    if not (nu > 0 and math.isfinite(nu)):
        raise ValueError(f"nu must be a finite number > 0, got {nu!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (ftol >= 0 and math.isfinite(ftol)):
        raise ValueError(f"ftol must be a finite number >= 0, got {ftol!r}")

    scale = _power_of_two_scale(matrix)
    # nu / scale could underflow to 0 for a huge scale, and then duplicates would divide by 0.
    scaled, smoothing = matrix / scale, max(nu / scale, torch.finfo(torch.float64).tiny)
    from_mean = _weiszfeld(scaled, alpha, alpha @ scaled, smoothing, max_iter, ftol)
    from_coordinate_median = _weiszfeld(scaled, alpha, weighted_coordinate_median(scaled, alpha), smoothing,
                                        max_iter, ftol)
    better = from_mean
    if _objective_difference(scaled, alpha, from_mean[0], from_coordinate_median[0]) > 0:
        better = from_coordinate_median
    median, beta, iterations, converged = better
    return GeometricMedianResult(median * scale, beta, iterations, converged)


def weighted_coordinate_median(points: ArrayLike, weights: ArrayLike | None = None) -> torch.Tensor:
    """Per coordinate, the weighted median; the mean of the two middle values on a tie (even K, equal weights)."""
    matrix = _as_matrix(points, "points")
    count = matrix.shape[0]
    alpha = (torch.full((count,), 1.0 / count, dtype=torch.float64) if weights is None
             else _as_vector(weights, count, "weights"))
    alpha = _normalised(alpha)
    values, order = torch.sort(matrix, dim=0)
    cumulative = alpha[order].cumsum(dim=0)
    # The relative slack makes a cumulative weight that should be exactly 1/2 count as a tie.
    lower = (cumulative >= 0.5 * (1 - 1e-12)).to(torch.int8).argmax(dim=0, keepdim=True)
    upper = (cumulative > 0.5 * (1 + 1e-12)).to(torch.int8).argmax(dim=0, keepdim=True)
    return ((values.gather(0, lower) + values.gather(0, upper)) / 2).squeeze(0)


def _objective_difference(points: torch.Tensor, alpha: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """sum_i alpha_i (||x_i - a|| - ||x_i - b||), without cancellation.

    With a point at 1e30 both objectives are ~1e30 and their float64 difference is 0
    even when a is in the cluster and b is not; the identity
    ||x - a|| - ||x - b|| = (b - a).(2x - a - b) / (||x - a|| + ||x - b||) keeps it.
    """
    to_a = torch.linalg.vector_norm(points - a, dim=1)
    to_b = torch.linalg.vector_norm(points - b, dim=1)
    numerator = (2 * points - a - b) @ (b - a)
    denominator = to_a + to_b
    # A zero denominator means x_i = a = b: that point adds nothing to the difference.
    terms = torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.zeros_like(denominator))
    return float(alpha @ terms)


def _weiszfeld(points: torch.Tensor, alpha: torch.Tensor, start: torch.Tensor, smoothing: float, max_iter: int,
               ftol: float) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    median, beta = start, alpha
    for iteration in range(1, max_iter + 1):
        distances = torch.linalg.vector_norm(points - median, dim=1)
        beta = alpha / distances.clamp_min(smoothing)
        beta = beta / beta.sum()
        updated = beta @ points
        step = float(torch.linalg.vector_norm(updated - median))
        median = updated
        if step <= ftol * max(float(torch.linalg.vector_norm(median)), smoothing):
            away = _off_a_data_point(points, alpha, median, smoothing)
            if away is None:
                return median, beta, iteration, True
            median = away
    return median, beta, max_iter, False


def _off_a_data_point(points: torch.Tensor, alpha: torch.Tensor, median: torch.Tensor,
                      smoothing: float) -> torch.Tensor | None:
    """Where to go from a data point the iteration stalled on, or None if it may stop.

    Next to a data point x_j the smoothed weight alpha_j / nu swamps the others, so each
    step moves by about nu: the stop rule fires wherever the iteration reaches a point,
    minimum or not. x_j is the minimum iff ||R_j|| <= eta_j (Kuhn's condition), with
    R_j = sum_{i not at x_j} alpha_i (x_i - x_j) / ||x_i - x_j|| and eta_j the weight at
    x_j; otherwise the modified Weiszfeld step of Vardi & Zhang (PNAS 2000) leaves it:
    x_j + (1 - eta_j / ||R_j||) (T_j - x_j), T_j the Weiszfeld point of the others.
    """
    nearest = int(torch.argmin(torch.linalg.vector_norm(points - median, dim=1)))
    anchor = points[nearest]
    offsets = points - anchor
    lengths = torch.linalg.vector_norm(offsets, dim=1)
    at_anchor = lengths <= smoothing
    if bool(at_anchor.all()):
        return None
    eta = float(alpha[at_anchor].sum())
    pull_weights = torch.where(at_anchor, torch.zeros_like(alpha), alpha / lengths.clamp_min(smoothing))
    pull = float(torch.linalg.vector_norm(pull_weights @ offsets))
    # A stalled step is about nu * ||R_j|| / eta_j long: further away, the iteration is not stuck here.
    stuck = float(torch.linalg.vector_norm(median - anchor)) <= 2 * smoothing * max(1.0, pull / max(eta, 1e-300))
    if not stuck or pull <= eta:
        return None
    target = (pull_weights @ points) / pull_weights.sum()
    return anchor + (1 - eta / pull) * (target - anchor)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _normalised(weights: torch.Tensor) -> torch.Tensor:
    """``weights`` / their sum; by way of their largest if the sum is past float64's range (every share would be 0)."""
    total = weights.sum()
    if bool(torch.isfinite(total)):
        return weights / total
    scaled = weights / weights.max()
    return scaled / scaled.sum()


def _as_matrix(values: ArrayLike, what: str) -> torch.Tensor:
    matrix = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    matrix = matrix.detach().to(device="cpu", dtype=torch.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D (clients x coordinates) array, "
                         f"got shape {tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{what} hold non-finite values; reject those clients first")
    return matrix


def _as_vector(values: ArrayLike, length: int, what: str) -> torch.Tensor:
    vector = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    vector = vector.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if vector.numel() != length:
        raise ValueError(f"{what} has {vector.numel()} entries, expected {length}")
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{what} holds non-finite values")
    return vector


def _power_of_two_scale(*tensors: torch.Tensor) -> float:
    """A power of two s with max|t| / s in [1, 2), or 1 for all-zero input.

    Dividing by a power of two is exact, so this changes no digit of the inputs.
    """
    largest = max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
    if largest == 0.0 or not math.isfinite(largest):
        return 1.0
    _, exponent = math.frexp(largest)
    return math.ldexp(1.0, exponent - 1)


def _trust_scores(client_units: torch.Tensor, server: torch.Tensor) -> torch.Tensor:
    server_unit = _unit_rows(server.unsqueeze(0))[0]
    # Rounding can put a cosine of parallel vectors a hair above 1.
    return (client_units @ server_unit).clamp(0.0, 1.0)


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Each row divided by its norm; zero rows stay zero.

    Rows are scaled separately so that a 1e30 row cannot push a small row's squares
    below the float64 range.
    """
    scales = torch.tensor([_power_of_two_scale(row) for row in matrix], dtype=torch.float64)
    scaled = matrix / scales.unsqueeze(1)
    norms = torch.linalg.vector_norm(scaled, dim=1)
    units = torch.where(norms.unsqueeze(1) > 0, scaled / norms.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1),
                        torch.zeros_like(scaled))
    return units
