"""Colluding, omniscient poisoning attacks (DESIGN.md section 4), as pure functions.

Every attack takes the benign updates as a 2-D float64 array ``benign`` (one row per
benign client, an update being ``client model - global model``), the number of
malicious clients ``m`` and the total number of clients ``n``, and returns the malicious
updates as an ``(m, d)`` float64 array. Attacks that send one vector return it repeated.
``mu`` and ``sigma`` are the per-coordinate mean and (population, ddof=0) standard
deviation of the benign rows; ddof=0 keeps sigma defined for a single benign row.

- ALIE (Baruch, Baruch & Goldberg, NeurIPS 2019, "A Little Is Enough"):
  ``mu + z * sigma`` with ``z = Phi^-1((n - m - s) / (n - m))``, ``s = floor(n/2 + 1) - m``.
- IPM (Xie, Koyejo & Gupta, UAI 2019, inner-product manipulation): ``-eps * mu``.
- min-max and min-sum (Shejwalkar & Houmansadr, NDSS 2021): ``mu - gamma * p`` with
  ``p`` = ``mu / ||mu||`` ("unit"), ``sign(mu)`` ("sign") or ``sigma`` ("std"), and gamma
  the largest value keeping the malicious update within the benign updates' own spread
  (see :func:`find_gamma`).
- Fang's trim attack (Fang, Cao, Jia & Gong, USENIX Security 2020, the full-knowledge
  attack on trimmed mean / median), applied to updates (see :func:`fang_trim`).
- Mimic (Karimireddy, He & Jaggi, ICLR 2022): every malicious client sends the update of
  one honest client. ``mimic`` picks that client again every round (see
  :func:`mimic_target_index`); ``mimic-fixed`` is the authors' attack: it estimates the
  direction of largest heterogeneity over a warm-up of rounds and then copies the same
  client for the rest of training (see :class:`FixedMimic`; ``mimic-fixed-<rounds>`` sets
  the warm-up, default 1 as in the authors' code).
- Backdoor within the validation loss (``backdoor-evade``; gate-aware, adaptive): the
  malicious clients train the backdoor, and each sends ``mu + gamma * (u - mu)``, its own
  backdoored update ``u`` moved from the benign mean ``mu`` (gamma = 1 is ``u`` as
  trained; gamma > 1 boosts it by model replacement, Bagdasaryan et al., AISTATS 2020;
  gamma < 1 blends it into the benign mean), with the largest ``gamma`` in ``[0, n]``
  whose loss on the attacker's own clean sample of the server's validation distribution
  stays at or below the median benign reply's loss on that sample (see
  :func:`largest_scale_within`); ``backdoor-evade-<q>`` takes the benign losses' q-quantile
  instead (``backdoor-evade-1``: as bad as the worst benign reply). The attacker knows that SoftMerge scores replies on
  clean validation data, so it keeps its reply as good there as a typical honest one
  while carrying as much backdoor as that allows. It needs a loss oracle, which the
  harness is given (``loss_of``); :func:`craft_malicious_updates` does not run it.
- Jittered Sybils: any of the above with ``-jitter`` appended (``min-sum-jitter``,
  ``alie-jitter``, ...). Each malicious client adds its own small Gaussian noise to the
  crafted update, ``jitter * sigma`` per coordinate (default :data:`DEFAULT_JITTER`, 1% of
  the benign spread; ``-jitter-<scale>`` sets it, ``mimic-jitter-0.3``), so no two
  malicious replies are bit-for-bit identical. This is the adaptive attack on a defense
  that merges identical replies into one (SoftMerge gates them as one and counts one
  client's examples for them): the copies then hold one gate and one count each, while
  the noise is far too small to change what they do.

No flwr here: :mod:`softmerge.simulations.harness` turns Flower replies into these arrays.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
from scipy.stats import norm

PERTURBATIONS = ("unit", "sign", "std")

JITTER_SUFFIX = "-jitter"
# Per-coordinate noise, as a multiple of the benign standard deviation, that a jittered
# attack adds to each copy: enough that no float32 copy equals another, small against
# the spread the honest updates have among themselves.
DEFAULT_JITTER = 0.01

# Canonical attack names accepted by craft_malicious_updates. "ipm-<eps>" accepts any
# positive number, and "min-max-<p>" / "min-sum-<p>" name the perturbation in the name.
COLLUDING_ATTACKS = ("alie", "ipm-0.1", "ipm-100", "min-max", "min-sum", "fang", "mimic", "mimic-fixed")
# Rounds over which mimic-fixed estimates its direction before it fixes its target: one,
# the default of the authors' code (a warm-up of one step).
DEFAULT_MIMIC_WARMUP = 1
# Attacks that also need the attacker's loss on its own clean data: the harness runs them.
ADAPTIVE_ATTACKS = ("backdoor-evade",)

# ALIE's probability leaves (0, 1) when m >= floor(n/2 + 1) (a malicious majority: it
# reaches 1) or when n <= 2 (it is 0), where Phi^-1 is infinite. We clamp it into
# [ALIE_PROBABILITY_CLAMP, 1 - ALIE_PROBABILITY_CLAMP], which bounds |z| by about 3.09:
# still "a little" per coordinate, and always finite.
ALIE_PROBABILITY_CLAMP = 1e-3


def _check_benign(benign: np.ndarray) -> np.ndarray:
    benign = np.asarray(benign, dtype=np.float64)
    if benign.ndim != 2 or benign.shape[0] < 1:
        raise ValueError(f"benign updates must be a 2-D array with at least one row; got shape {benign.shape}")
    if not np.isfinite(benign).all():
        raise ValueError("benign updates must be finite")
    return benign


def _check_counts(num_malicious: int, num_total: int | None = None) -> None:
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0; got {num_malicious}")
    if num_total is not None and num_total <= num_malicious:
        raise ValueError(f"num_total must exceed num_malicious; got n={num_total}, m={num_malicious}")


def _repeat(row: np.ndarray, num_malicious: int) -> np.ndarray:
    return np.tile(row, (num_malicious, 1))


def benign_statistics(benign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate mean and population standard deviation of the benign updates."""
    benign = _check_benign(benign)
    return benign.mean(axis=0), benign.std(axis=0)


# --- ALIE -------------------------------------------------------------------------------

def alie_z(num_malicious: int, num_total: int) -> float:
    """ALIE's z = Phi^-1((n - m - s) / (n - m)), s = floor(n/2 + 1) - m, probability clamped."""
    _check_counts(num_malicious, num_total)
    n, m = num_total, num_malicious
    supporters = math.floor(n / 2 + 1) - m
    probability = (n - m - supporters) / (n - m)
    probability = min(max(probability, ALIE_PROBABILITY_CLAMP), 1.0 - ALIE_PROBABILITY_CLAMP)
    return float(norm.ppf(probability))


def alie(benign: np.ndarray, num_malicious: int, num_total: int, z: float | None = None) -> np.ndarray:
    """``mu + z * sigma`` for every malicious client; z from :func:`alie_z` unless given."""
    mu, sigma = benign_statistics(benign)
    z = alie_z(num_malicious, num_total) if z is None else float(z)
    return _repeat(mu + z * sigma, num_malicious)


# --- IPM --------------------------------------------------------------------------------

def ipm(benign: np.ndarray, num_malicious: int, epsilon: float = 0.1) -> np.ndarray:
    """``-epsilon * mu`` for every malicious client."""
    _check_counts(num_malicious)
    mu, _ = benign_statistics(benign)
    return _repeat(-float(epsilon) * mu, num_malicious)


# --- min-max and min-sum ----------------------------------------------------------------

def perturbation_vector(benign: np.ndarray, kind: str = "std") -> np.ndarray:
    """The direction p that min-max / min-sum subtract from mu: unit mean, sign of the mean, or std."""
    mu, sigma = benign_statistics(benign)
    if kind == "unit":
        norm_mu = np.linalg.norm(mu)
        # A zero mean has no direction; p = 0 leaves the malicious update at mu.
        return mu / norm_mu if norm_mu > 0 else np.zeros_like(mu)
    if kind == "sign":
        return np.sign(mu)
    if kind == "std":
        return sigma
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {', '.join(PERTURBATIONS)}")


def _pairwise_distances(benign: np.ndarray) -> np.ndarray:
    # Direct differences rather than the Gram-matrix identity, which loses precision
    # when the updates are large and close together.
    return np.stack([np.linalg.norm(benign - row, axis=1) for row in benign])


def min_max_criterion(benign: np.ndarray) -> Callable[[np.ndarray], bool]:
    """Feasibility of a candidate: max_i ||c - g_i|| <= max_{i,j} ||g_i - g_j||."""
    benign = _check_benign(benign)
    bound = _pairwise_distances(benign).max()
    return lambda candidate: bool(np.linalg.norm(benign - candidate, axis=1).max() <= bound)


def min_sum_criterion(benign: np.ndarray) -> Callable[[np.ndarray], bool]:
    """Feasibility of a candidate: sum_i ||c - g_i||^2 <= max_i sum_j ||g_i - g_j||^2."""
    benign = _check_benign(benign)
    bound = (_pairwise_distances(benign) ** 2).sum(axis=1).max()
    return lambda candidate: bool((np.linalg.norm(benign - candidate, axis=1) ** 2).sum() <= bound)


def find_gamma(
    benign: np.ndarray,
    perturbation: np.ndarray,
    criterion: Callable[[np.ndarray], bool],
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
    max_doublings: int = 60,
    max_halvings: int = 200,
) -> float:
    """Largest gamma >= 0 with ``criterion(mu - gamma * perturbation)`` true, to ``tolerance``.

    gamma = 0 (the malicious update is mu) is always feasible for both criteria: mu lies
    within the benign updates' spread. Both constraints are convex in gamma, so the
    feasible gammas form an interval [0, gamma*] and bisection finds its end. The search
    first brackets gamma*: starting at ``gamma_init`` it doubles the upper end while
    that end is still feasible (at most ``max_doublings`` times; a zero perturbation is
    feasible for every gamma, and then the last doubled value is returned). It then
    halves the bracket [feasible, infeasible] until it is narrower than
    ``tolerance * gamma`` (at most ``max_halvings`` times), and returns the feasible end, so the answer always
    satisfies the constraint. Shejwalkar & Houmansadr start at 10 and halve the step
    the same way; the bracketing step only lifts their implicit cap of 2 * gamma_init.
    """
    benign = _check_benign(benign)
    if gamma_init <= 0 or tolerance <= 0:
        raise ValueError("gamma_init and tolerance must be positive")
    mu = benign.mean(axis=0)
    perturbation = np.asarray(perturbation, dtype=np.float64)

    def feasible(gamma: float) -> bool:
        return criterion(mu - gamma * perturbation)

    low, high = 0.0, float(gamma_init)
    for _ in range(max_doublings):
        if not feasible(high):
            break
        low, high = high, 2.0 * high
    else:
        return low
    for _ in range(max_halvings):
        # Relative to gamma: late-round updates are small, and for the unit and sign
        # perturbations gamma* is then far below 1, where an absolute width fell short of it.
        if low > 0 and high - low <= tolerance * low:
            break
        middle = 0.5 * (low + high)
        if feasible(middle):
            low = middle
        else:
            high = middle
    return low


def min_max(
    benign: np.ndarray,
    num_malicious: int,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """``mu - gamma * p``, gamma the largest with max_i ||m - g_i|| <= max_{i,j} ||g_i - g_j||."""
    return _optimised_deviation(benign, num_malicious, perturbation, min_max_criterion, gamma_init, tolerance)


def min_sum(
    benign: np.ndarray,
    num_malicious: int,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """``mu - gamma * p``, gamma the largest with sum_i ||m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2."""
    return _optimised_deviation(benign, num_malicious, perturbation, min_sum_criterion, gamma_init, tolerance)


def _optimised_deviation(benign, num_malicious, perturbation, make_criterion, gamma_init, tolerance):
    _check_counts(num_malicious)
    benign = _check_benign(benign)
    direction = perturbation_vector(benign, perturbation)
    gamma = find_gamma(benign, direction, make_criterion(benign), gamma_init, tolerance)
    return _repeat(benign.mean(axis=0) - gamma * direction, num_malicious)


# --- Fang's trim attack -----------------------------------------------------------------

def fang_trim(benign: np.ndarray, num_malicious: int, rng: np.random.Generator, b: float = 2.0) -> np.ndarray:
    """Fang et al.'s full-knowledge attack on trimmed mean / median, in update space.

    s_j = sign(mu_j) estimates the direction coordinate j moves without attack; the
    attackers push it the other way with values just beyond the benign extremes
    (max_j, min_j over the benign rows), each drawn uniformly and independently per
    malicious client and coordinate:

    - s_j < 0: in [max_j, b * max_j] if max_j > 0, else in [max_j, max_j / b];
    - s_j >= 0: in [min_j / b, min_j] if min_j > 0, else in [b * min_j, min_j].

    The paper states it on model parameters; on updates (as Shejwalkar & Houmansadr
    re-implement it) the same intervals apply to ``client - global``. A zero mean takes
    the s_j >= 0 branch.
    """
    _check_counts(num_malicious)
    benign = _check_benign(benign)
    if b <= 1:
        raise ValueError(f"b must be > 1; got {b}")
    mu = benign.mean(axis=0)
    high_values, low_values = benign.max(axis=0), benign.min(axis=0)
    push_up = mu < 0
    # Intervals for pushing up (beyond the benign maximum) and down (below the minimum).
    up_low, up_high = high_values, np.where(high_values > 0, b * high_values, high_values / b)
    down_low, down_high = np.where(low_values > 0, low_values / b, b * low_values), low_values
    lower = np.where(push_up, up_low, down_low)
    upper = np.where(push_up, up_high, down_high)
    return rng.uniform(lower, upper, size=(num_malicious, benign.shape[1]))


# --- Mimic ------------------------------------------------------------------------------

def mimic_target_index(benign: np.ndarray) -> int:
    """The benign row most extreme along the top principal direction of the benign updates.

    Karimireddy, He & Jaggi pick the honest worker whose copy most inflates the
    variance in the direction of largest heterogeneity; we take the row with the largest
    ``|<v, g_i - mu>|`` for v the top right-singular vector of the centred rows (the
    absolute value because the sign of v is arbitrary). Ties go to the lowest index; with
    identical rows there is no direction and row 0 is chosen.

    The target is chosen again every round, from that round's updates. The authors'
    attack estimates the direction over a warm-up of rounds and then copies one client
    for the rest of training, a steadier bias: that is ``mimic-fixed``
    (:class:`FixedMimic`; over 20 rounds of 8 skewed clients this rule picked 5 different
    targets, the published one 1).
    """
    benign = _check_benign(benign)
    centred = benign - benign.mean(axis=0)
    if benign.shape[0] < 2 or not np.any(centred):
        return 0
    _, _, right = np.linalg.svd(centred, full_matrices=False)
    return int(np.argmax(np.abs(centred @ right[0])))


def mimic(benign: np.ndarray, num_malicious: int, target: int | str = "pca") -> np.ndarray:
    """Every malicious client sends benign row ``target`` (``"pca"``: :func:`mimic_target_index`)."""
    _check_counts(num_malicious)
    benign = _check_benign(benign)
    index = mimic_target_index(benign) if target == "pca" else int(target)
    return _repeat(benign[index], num_malicious)


def mimic_power_step(benign: np.ndarray, mean: np.ndarray, direction: np.ndarray) -> np.ndarray | None:
    """One power step on the benign scatter about ``mean``: ``sum_i <g_i - mean, z> (g_i - mean)``, normalised.

    None when the step vanishes (every row equals ``mean``, or ``z`` is orthogonal to all of
    them): there is no direction to follow this round.
    """
    centred = _check_benign(benign) - mean
    step = centred.T @ (centred @ direction)
    norm = np.linalg.norm(step)
    return step / norm if norm > 0 and np.isfinite(norm) else None


class FixedMimic:
    """The authors' Mimic: the direction of largest heterogeneity over a warm-up, then one client for good.

    Karimireddy, He & Jaggi (ICLR 2022, "Byzantine-robust learning on heterogeneous
    datasets via bucketing"), their variant with a warm-up of ``warmup`` rounds. In warm-up
    round t (t = 0, 1, ...), with ``avg`` the mean of that round's benign updates g_i:

    - t = 0: ``mu = avg``; ``z`` is one power step (:func:`mimic_power_step`) from a random
      Gaussian vector;
    - t > 0: ``mu <- (t mu + avg) / (t + 1)``; ``z <- (t z + step) / (t + 1)``, normalised,
      ``step`` the normalised power step from ``z`` about the running ``mu``;
    - the round's target is the client with the largest ``<g_i, z>``.

    After the warm-up the last target is kept: every malicious client sends that client's
    update, whatever the updates do. Clients are known by their labels (partition ids),
    not by row, because the rows of a round come in any order. A round in which the fixed
    target did not reply (sampling) copies the client with the largest ``<g_i, z>`` instead
    and keeps the target; the authors' setting has every client in every round.

    The warm-up counts the rounds this is called in: in the harness, the rounds in which
    at least one malicious client was sampled (all of them at ``fraction-train`` 1). Its
    rows are whatever updates the attacker knows: with partial knowledge, its own, so the
    target is one of the malicious clients.
    """

    def __init__(self, warmup: int = DEFAULT_MIMIC_WARMUP) -> None:
        if isinstance(warmup, bool) or not float(warmup).is_integer() or warmup < 1:
            raise ValueError(f"mimic-fixed's warm-up is a whole number of rounds >= 1; got {warmup!r}")
        self.warmup = int(warmup)
        self.rounds_seen = 0
        self.mean: np.ndarray | None = None
        self.direction: np.ndarray | None = None
        self.target: int | None = None
        self.last_copied: int | None = None  # whose update the last call chose (for logs)

    def choose(self, benign: np.ndarray, labels: list[int], rng: np.random.Generator) -> int:
        """The row of ``benign`` to copy this round (``labels[i]`` names row i's client)."""
        benign = _check_benign(benign)
        if len(labels) != benign.shape[0]:
            raise ValueError(f"{len(labels)} labels for {benign.shape[0]} benign rows")
        if self.direction is not None and self.direction.shape[0] != benign.shape[1]:
            raise ValueError(f"mimic-fixed's direction has {self.direction.shape[0]} coordinates, "
                             f"the updates {benign.shape[1]}")
        if self.rounds_seen >= self.warmup:
            if self.target in labels:
                index = labels.index(self.target)
            else:
                index = int(np.argmax(benign @ self.direction))  # absent this round; it stays the target
        else:
            self._learn_direction(benign, rng)
            self.rounds_seen += 1
            index = int(np.argmax(benign @ self.direction))
            self.target = labels[index]
        self.last_copied = labels[index]
        return index

    def to_arrays(self) -> dict[str, np.ndarray]:
        """What a resumed run needs to attack as an uninterrupted one (empty before the first round)."""
        if self.direction is None:
            return {}
        return {"mean": self.mean, "direction": self.direction,
                "rounds_seen": np.array(self.rounds_seen, dtype=np.int64),
                "target": np.array(self.target, dtype=np.int64)}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Take back :meth:`to_arrays`' output; raises ValueError (and changes nothing) if it is malformed."""
        if not arrays:
            return
        try:
            mean, direction = np.asarray(arrays["mean"]), np.asarray(arrays["direction"])
            rounds_seen, target = np.asarray(arrays["rounds_seen"]), np.asarray(arrays["target"])
        except KeyError as missing:
            raise ValueError(f"mimic-fixed's saved state lacks {missing}") from None
        if (mean.ndim != 1 or mean.shape != direction.shape or not np.isfinite(mean).all()
                or not np.isfinite(direction).all() or not np.isclose(np.linalg.norm(direction), 1.0)):
            raise ValueError("mimic-fixed's saved mean and direction are not two finite vectors, "
                             "the direction of unit length")
        if rounds_seen.shape or target.shape or rounds_seen.dtype.kind != "i" or target.dtype.kind != "i" \
                or rounds_seen < 1:
            raise ValueError("mimic-fixed's saved round count and target are not integers (count >= 1)")
        self.mean, self.direction = mean.astype(np.float64), direction.astype(np.float64)
        self.rounds_seen, self.target = int(rounds_seen), int(target)

    def _learn_direction(self, benign: np.ndarray, rng: np.random.Generator) -> None:
        average = benign.mean(axis=0)
        t = self.rounds_seen
        if t == 0:
            self.mean = average
            start = rng.standard_normal(benign.shape[1])
            step = mimic_power_step(benign, self.mean, start)
            self.direction = step if step is not None else start / np.linalg.norm(start)
            return
        self.mean = (t * self.mean + average) / (t + 1)
        step = mimic_power_step(benign, self.mean, self.direction)
        if step is not None:
            blended = (t * self.direction + step) / (t + 1)
            norm = np.linalg.norm(blended)
            if norm > 0:
                self.direction = blended / norm


# --- jittered Sybils --------------------------------------------------------------------

def jitter_copies(crafted: np.ndarray, benign: np.ndarray, rng: np.random.Generator,
                  scale: float = DEFAULT_JITTER) -> np.ndarray:
    """Each row of ``crafted`` plus its own Gaussian noise of std ``scale * sigma`` per coordinate.

    sigma is the benign rows' per-coordinate standard deviation, so the noise follows the
    honest spread: coordinates on which the honest clients agree (sigma = 0) stay as crafted.
    """
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"jitter must be a finite number >= 0; got {scale}")
    _, sigma = benign_statistics(benign)
    return crafted + rng.standard_normal(crafted.shape) * (scale * sigma)


# --- adaptive: a backdoor moved as far as the validation loss allows --------------------

def largest_scale_within(loss_at: Callable[[float], float], threshold: float, upper: float,
                         iterations: int = 12) -> float:
    """The largest ``gamma`` in ``[0, upper]`` with ``loss_at(gamma) <= threshold``.

    ``loss_at(gamma)`` is the attacker's clean-sample loss of its reply at ``gamma``
    (``mu + gamma * (u - mu)`` for backdoor-evade). The search assumes the loss grows with
    gamma, as it does moving away from a good model: it bisects on log gamma in
    ``[1, upper]`` when gamma = 1 passes, else on gamma in ``[0, 1]``; a non-finite loss
    counts as too large. Returns ``upper`` when that passes and 0 when nothing does (the
    reply is then the benign mean). ``iterations`` bisection steps bound the answer to a
    factor ``upper ** (2 ** -iterations)`` above 1, or ``2 ** -iterations`` below it.
    """
    if not (math.isfinite(upper) and upper >= 1):
        raise ValueError(f"the largest scale must be a finite number >= 1; got {upper}")

    def passes(gamma: float) -> bool:
        loss = loss_at(gamma)
        return math.isfinite(loss) and loss <= threshold

    if passes(1.0):
        if upper == 1 or passes(upper):
            return float(upper)
        low, high, to_gamma = 0.0, math.log(upper), math.exp  # on log gamma
    else:
        low, high, to_gamma = 0.0, 1.0, float
    for _ in range(iterations):
        middle = (low + high) / 2
        if passes(to_gamma(middle)):
            low = middle
        else:
            high = middle
    return to_gamma(low)


# --- dispatcher -------------------------------------------------------------------------

_IPM_NAME = re.compile(r"^ipm(?:-(?P<eps>.+))?$")
_JITTER_NAME = re.compile(r"^(?P<base>.+?)-jitter(?:-(?P<scale>.+))?$")
_DEVIATION_NAME = re.compile(r"^(?P<kind>min-max|min-sum)(?:-(?P<p>unit|sign|std))?$")
_MIMIC_FIXED_NAME = re.compile(r"^mimic-fixed-(?P<rounds>.+)$")
# One spelling per warm-up ("mimic-fixed-3", not "-03" or "-3.0"): the name keys grid cells.
_WHOLE_NUMBER = re.compile(r"^[1-9][0-9]*$")
_EVADE_NAME = re.compile(r"^backdoor-evade(?:-(?P<q>.+))?$")


def is_adaptive_attack(name: str) -> bool:
    """Whether ``name`` is a colluding attack that needs the attacker's clean-data loss."""
    return is_colluding_attack(name) and parse_attack_name(name)[0] in ADAPTIVE_ATTACKS


def is_colluding_attack(name: str) -> bool:
    """Whether ``name`` is an attack :func:`craft_malicious_updates` knows."""
    try:
        parse_attack_name(name)
    except ValueError:
        return False
    return True


def _positive_number(text: str, what: str, example: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} needs a positive number, e.g. {example}")
    return value


def parse_attack_name(name: str) -> tuple[str, dict]:
    """``(kind, implied parameters)`` of an attack name; raises ValueError naming the known ones.

    A ``-jitter`` suffix adds ``{"jitter": DEFAULT_JITTER}`` to the base attack's
    parameters, ``-jitter-<scale>`` (``mimic-jitter-0.3``) ``{"jitter": scale}``.
    """
    jitter_match = _JITTER_NAME.match(name)
    if jitter_match:
        if name.count(JITTER_SUFFIX) > 1:
            raise ValueError(f"attack {name!r}: -jitter appears twice")
        kind, params = parse_attack_name(jitter_match["base"])
        if kind in ADAPTIVE_ATTACKS:
            raise ValueError(f"attack {name!r}: {kind} sends each client's own update, so there are no "
                             "copies to jitter")
        scale = (DEFAULT_JITTER if jitter_match["scale"] is None else
                 _positive_number(jitter_match["scale"], f"attack {name!r}: -jitter-<scale>", "mimic-jitter-0.3"))
        return kind, {**params, "jitter": scale}
    if name in ("alie", "fang", "mimic", "mimic-fixed"):
        return name, {}
    warmup_match = _MIMIC_FIXED_NAME.match(name)
    if warmup_match:
        if not _WHOLE_NUMBER.match(warmup_match["rounds"]):
            raise ValueError(f"attack {name!r}: mimic-fixed-<rounds> needs a whole number of warm-up rounds "
                             "written without leading zeros or a decimal point, e.g. mimic-fixed-5")
        return "mimic-fixed", {"warmup": int(warmup_match["rounds"])}
    evade_match = _EVADE_NAME.match(name)
    if evade_match:
        if evade_match["q"] is None:
            return "backdoor-evade", {}
        try:
            quantile = float(evade_match["q"])
        except ValueError:
            quantile = math.nan
        if not 0 <= quantile <= 1:
            raise ValueError(f"attack {name!r}: backdoor-evade-<q> needs a quantile in [0, 1], e.g. backdoor-evade-1")
        return "backdoor-evade", {"quantile": quantile}
    ipm_match = _IPM_NAME.match(name)
    if ipm_match:
        if ipm_match["eps"] is None:
            return "ipm", {}
        return "ipm", {"epsilon": _positive_number(ipm_match["eps"], f"attack {name!r}: ipm-<eps>",
                                                   "ipm-0.1 or ipm-100")}
    deviation_match = _DEVIATION_NAME.match(name)
    if deviation_match:
        params = {"perturbation": deviation_match["p"]} if deviation_match["p"] else {}
        return deviation_match["kind"], params
    raise ValueError(f"unknown colluding attack {name!r}; known: {', '.join(COLLUDING_ATTACKS + ADAPTIVE_ATTACKS)}, "
                     "ipm-<eps>, min-max-<unit|sign|std>, min-sum-<unit|sign|std>, mimic-fixed-<warm-up rounds>, "
                     "backdoor-evade-<quantile>, "
                     "each optionally with -jitter or -jitter-<scale> (e.g. min-sum-jitter, mimic-jitter-0.3)")


def craft_malicious_updates(
    name: str,
    benign_updates: np.ndarray,
    num_malicious: int,
    num_total: int,
    rng: np.random.Generator | None = None,
    **params,
) -> np.ndarray:
    """The ``(num_malicious, d)`` malicious updates of attack ``name``, from the benign updates.

    Names: ``alie``, ``ipm-<eps>`` (``ipm-0.1``, ``ipm-100``; plain ``ipm`` takes
    ``epsilon=``), ``min-max`` / ``min-sum`` (optionally ``-unit``, ``-sign`` or ``-std``,
    default std; or ``perturbation=``), ``fang`` (needs ``rng``; ``b=``), ``mimic``
    (``target=``), ``mimic-fixed`` (needs ``rng``, ``tracker=``, the :class:`FixedMimic`
    that carries its target from round to round, and ``labels=``, the benign rows'
    client labels). Keyword ``params`` override what the name implies. Any of them with
    ``-jitter`` appended (or ``jitter=<scale>``) goes through :func:`jitter_copies`, which
    needs ``rng``; ``jitter=0`` sends the copies unjittered.
    """
    kind, implied = parse_attack_name(name)
    if kind in ADAPTIVE_ATTACKS:
        raise ValueError(f"{kind} needs the attacker's clean-data loss: run it through the harness "
                         "(ColludingAdversary(..., loss_of=...))")
    params = {**implied, **params}
    jitter = params.pop("jitter", 0.0)
    if jitter and rng is None:
        raise ValueError("a jittered attack draws its noise: pass a numpy Generator as rng")
    if kind == "alie":
        crafted = alie(benign_updates, num_malicious, num_total, **params)
    elif kind == "ipm":
        crafted = ipm(benign_updates, num_malicious, **params)
    elif kind == "min-max":
        crafted = min_max(benign_updates, num_malicious, **params)
    elif kind == "min-sum":
        crafted = min_sum(benign_updates, num_malicious, **params)
    elif kind == "fang":
        if rng is None:
            raise ValueError("the fang attack samples its values: pass a numpy Generator as rng")
        crafted = fang_trim(benign_updates, num_malicious, rng, **params)
    elif kind == "mimic-fixed":
        tracker, labels = params.pop("tracker", None), params.pop("labels", None)
        params.pop("warmup", None)  # the tracker was built with it
        if tracker is None or labels is None or rng is None:
            raise ValueError("mimic-fixed chooses its target over rounds: pass tracker=FixedMimic(warmup), "
                             "labels= (one per benign row) and rng")
        if params:
            raise ValueError(f"mimic-fixed takes no {', '.join(sorted(params))}")
        _check_counts(num_malicious)
        benign = _check_benign(benign_updates)
        crafted = _repeat(benign[tracker.choose(benign, list(labels), rng)], num_malicious)
    else:
        crafted = mimic(benign_updates, num_malicious, **params)
    return jitter_copies(crafted, benign_updates, rng, float(jitter)) if jitter else crafted
