"""Colluding omniscient attacks against their formulas, and the harness that applies them."""

import math
import random
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from scipy.stats import norm

from softmerge.aggregation.merge import duplicate_groups
from softmerge.simulations import colluding
from softmerge.simulations.colluding import (
    FixedMimic,
    alie,
    alie_z,
    craft_malicious_updates,
    fang_trim,
    find_gamma,
    is_colluding_attack,
    jitter_copies,
    ipm,
    mimic,
    mimic_power_step,
    mimic_target_index,
    min_max,
    min_max_criterion,
    min_sum,
    min_sum_criterion,
    perturbation_vector,
)
from softmerge.simulations.harness import ColludingAdversary, make_colluding

from flower_helpers import StubGrid, make_reply

pytestmark = pytest.mark.usefixtures("task_identity")


# A three-client, two-coordinate example: mu = (3, 4), sigma = (sqrt(8/3), sqrt(8)).
SMALL = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])
SMALL_MU = np.array([3.0, 4.0])
SMALL_SIGMA = np.array([math.sqrt(8 / 3), math.sqrt(8)])


def _spread_updates(seed=0, rows=6, dim=5, scale=1.0):
    return np.random.default_rng(seed).normal(size=(rows, dim)) * scale + 0.3


# --- ALIE ------------------------------------------------------------------------------

def test_alie_z_follows_the_formula_by_hand():
    # n=10, m=3: s = floor(6) - 3 = 3, probability (10 - 3 - 3) / 7 = 4/7.
    assert alie_z(3, 10) == pytest.approx(norm.ppf(4 / 7))
    assert alie_z(3, 10) == pytest.approx(0.18001, abs=1e-4)
    # n=10, m=2: s = 4, probability 4/8 = 1/2, so z = 0 and ALIE sends the benign mean.
    assert alie_z(2, 10) == 0.0
    # n=50, m=12 (the paper's setting): s = 14, probability 24/38.
    assert alie_z(12, 50) == pytest.approx(norm.ppf(24 / 38))


def test_alie_z_is_clamped_where_the_probability_leaves_the_open_interval():
    # A malicious majority (m >= floor(n/2 + 1)) makes the probability >= 1.
    assert alie_z(6, 10) == pytest.approx(norm.ppf(1 - colluding.ALIE_PROBABILITY_CLAMP))
    assert alie_z(9, 10) == alie_z(6, 10)
    # n = 2 makes it 0.
    assert alie_z(1, 2) == pytest.approx(norm.ppf(colluding.ALIE_PROBABILITY_CLAMP))
    assert all(math.isfinite(alie_z(m, n)) for n in range(1, 30) for m in range(n))
    with pytest.raises(ValueError):
        alie_z(3, 3)


def test_alie_is_mean_plus_z_sigma_for_every_malicious_client():
    result = alie(SMALL, 2, 5)  # s = 3 - 2 = 1, probability (5 - 2 - 1) / 3 = 2/3
    z = norm.ppf(2 / 3)
    assert result.shape == (2, 2)
    np.testing.assert_allclose(result, np.tile(SMALL_MU + z * SMALL_SIGMA, (2, 1)))
    np.testing.assert_allclose(alie(SMALL, 1, 5, z=1.5)[0], SMALL_MU + 1.5 * SMALL_SIGMA)


# --- IPM -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, epsilon", [("ipm-0.1", 0.1), ("ipm-100", 100.0)])
def test_ipm_is_minus_epsilon_times_the_mean(name, epsilon):
    expected = np.tile(-epsilon * SMALL_MU, (3, 1))
    np.testing.assert_allclose(craft_malicious_updates(name, SMALL, 3, 6), expected)
    np.testing.assert_allclose(ipm(SMALL, 3, epsilon=epsilon), expected)


# --- min-max and min-sum ---------------------------------------------------------------

def _gamma_of(result_row, benign, direction):
    """Recover gamma from mu - gamma * p."""
    return float((benign.mean(axis=0) - result_row) @ direction / (direction @ direction))


def _min_max_gamma_closed_form(benign, direction):
    # ||mu - g_i - gamma p||^2 <= R^2 is a quadratic in gamma per benign row; the largest
    # feasible gamma is the smallest of the rows' positive roots.
    mu = benign.mean(axis=0)
    bound = max(np.linalg.norm(a - b) for a in benign for b in benign)
    roots = []
    for row in benign:
        offset = mu - row
        a, b, c = direction @ direction, -2 * direction @ offset, offset @ offset - bound**2
        roots.append((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    return min(roots)


def _min_sum_gamma_closed_form(benign, direction):
    # sum_i ||mu - g_i - gamma p||^2 = sum_i ||mu - g_i||^2 + n gamma^2 ||p||^2 (the cross
    # terms sum to zero around the mean), so gamma* = sqrt((B - S) / (n ||p||^2)).
    mu = benign.mean(axis=0)
    spread = sum(np.linalg.norm(mu - row) ** 2 for row in benign)
    bound = max(sum(np.linalg.norm(a - b) ** 2 for b in benign) for a in benign)
    return math.sqrt((bound - spread) / (len(benign) * (direction @ direction)))


@pytest.mark.parametrize("perturbation", ["unit", "sign", "std"])
# 100: gamma* lies beyond gamma_init = 10; 1e-5 (late-round updates): gamma* far below 1 for unit and sign
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e-5])
def test_min_max_keeps_its_constraint_with_the_largest_gamma(perturbation, scale):
    benign = _spread_updates(scale=scale)
    direction = perturbation_vector(benign, perturbation)
    result = min_max(benign, 3, perturbation=perturbation, tolerance=1e-6)
    assert result.shape == (3, 5) and np.all(result == result[0])
    gamma = _gamma_of(result[0], benign, direction)
    np.testing.assert_allclose(result[0], benign.mean(axis=0) - gamma * direction)
    feasible = min_max_criterion(benign)
    assert feasible(result[0])
    assert not feasible(benign.mean(axis=0) - gamma * (1 + 1e-5) * direction)
    assert gamma == pytest.approx(_min_max_gamma_closed_form(benign, direction), rel=1e-5)


@pytest.mark.parametrize("perturbation", ["unit", "sign", "std"])
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e-5])
def test_min_sum_keeps_its_constraint_with_the_largest_gamma(perturbation, scale):
    benign = _spread_updates(seed=1, scale=scale)
    direction = perturbation_vector(benign, perturbation)
    result = min_sum(benign, 2, perturbation=perturbation, tolerance=1e-6)
    gamma = _gamma_of(result[0], benign, direction)
    feasible = min_sum_criterion(benign)
    assert feasible(result[0])
    assert not feasible(benign.mean(axis=0) - gamma * (1 + 1e-5) * direction)
    assert gamma == pytest.approx(_min_sum_gamma_closed_form(benign, direction), rel=1e-5)


def test_perturbations_are_unit_mean_sign_and_std():
    np.testing.assert_allclose(perturbation_vector(SMALL, "unit"), SMALL_MU / 5.0)
    np.testing.assert_array_equal(perturbation_vector(SMALL, "sign"), [1.0, 1.0])
    np.testing.assert_allclose(perturbation_vector(SMALL, "std"), SMALL_SIGMA)
    with pytest.raises(ValueError, match="perturbation"):
        perturbation_vector(SMALL, "gradient")


def test_min_max_on_identical_updates_sends_the_common_update():
    benign = np.tile([1.0, -2.0, 0.5], (4, 1))  # sigma = 0: no perturbation to scale
    np.testing.assert_allclose(min_max(benign, 2), benign[:2])
    assert find_gamma(benign, np.zeros(3), min_max_criterion(benign), max_doublings=5) == 160.0


def test_min_max_default_perturbation_is_std_and_names_select_the_others():
    benign = _spread_updates(seed=2)
    np.testing.assert_allclose(craft_malicious_updates("min-max", benign, 2, 8), min_max(benign, 2, "std"))
    np.testing.assert_allclose(craft_malicious_updates("min-sum-unit", benign, 2, 8), min_sum(benign, 2, "unit"))
    np.testing.assert_allclose(craft_malicious_updates("min-max", benign, 2, 8, perturbation="sign"),
                               min_max(benign, 2, "sign"))


# --- Fang ------------------------------------------------------------------------------

def test_fang_values_lie_in_the_stated_intervals_on_the_opposite_side():
    # Columns: (mu > 0, min > 0), (mu < 0, max <= 0), (mu < 0, max > 0), (mu > 0, min <= 0).
    benign = np.array([[1.0, -1.0, 1.0, -1.0], [3.0, -3.0, -5.0, 5.0]])
    low = np.array([0.5, -1.0, 1.0, -2.0])   # min/b, max, max, b*min
    high = np.array([1.0, -0.5, 2.0, -1.0])  # min, max/b, b*max, min
    result = fang_trim(benign, 400, np.random.default_rng(0), b=2.0)
    assert result.shape == (400, 4)
    assert np.all(result >= low) and np.all(result <= high)
    # Uniform draws fill their interval, so the values are not stuck at one end.
    assert np.all(result.min(axis=0) < low + 0.05 * (high - low))
    assert np.all(result.max(axis=0) > high - 0.05 * (high - low))
    # Pushing against the benign direction: below the minimum where the mean is positive,
    # above the maximum where it is negative.
    mu = benign.mean(axis=0)
    assert np.all(result[:, mu > 0] <= benign.min(axis=0)[mu > 0])
    assert np.all(result[:, mu < 0] >= benign.max(axis=0)[mu < 0])


def test_fang_is_reproducible_from_the_generator_and_needs_one():
    benign = _spread_updates(seed=3, rows=5, dim=40)
    first = craft_malicious_updates("fang", benign, 3, 8, rng=np.random.default_rng(7))
    again = craft_malicious_updates("fang", benign, 3, 8, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1])  # each malicious client draws its own values
    with pytest.raises(ValueError, match="Generator"):
        craft_malicious_updates("fang", benign, 3, 8)


# --- Mimic -----------------------------------------------------------------------------

def test_mimic_copies_the_benign_update_most_extreme_along_the_top_direction():
    benign = np.array([[0.0, 0.1], [0.2, -0.1], [10.0, 0.0], [0.1, 0.0], [-0.3, 0.05]])
    assert mimic_target_index(benign) == 2
    result = mimic(benign, 3)
    np.testing.assert_array_equal(result, np.tile(benign[2], (3, 1)))
    np.testing.assert_array_equal(mimic(benign, 2, target=4), np.tile(benign[4], (2, 1)))
    updates = craft_malicious_updates("mimic", _spread_updates(seed=4), 2, 8)
    assert any(np.array_equal(updates[0], row) for row in _spread_updates(seed=4))


def test_mimic_power_step_by_hand():
    # Rows (2, 0) and (0, 0): mean (1, 0), centred (1, 0) and (-1, 0). From z = (1, 1)/sqrt(2) the
    # step is sum_i <c_i, z> c_i = (sqrt(2), 0), normalised (1, 0).
    benign = np.array([[2.0, 0.0], [0.0, 0.0]])
    step = mimic_power_step(benign, np.array([1.0, 0.0]), np.array([1.0, 1.0]) / math.sqrt(2))
    np.testing.assert_allclose(step, [1.0, 0.0])
    # No scatter along z (every row is the mean): no direction this round.
    assert mimic_power_step(np.ones((3, 2)), np.ones(2), np.array([1.0, 0.0])) is None


def test_fixed_mimic_warm_up_follows_the_authors_running_estimates():
    rounds = [np.random.default_rng(r).standard_normal((5, 4)) + [r, 0, 0, 0] for r in range(3)]
    tracker = FixedMimic(warmup=3)
    picks = [tracker.choose(b, list(range(5)), np.random.default_rng([7, r])) for r, b in enumerate(rounds)]
    # The same estimates written out: mu a running mean, z a running mean of normalised power steps.
    mu = rounds[0].mean(axis=0)
    z = mimic_power_step(rounds[0], mu, np.random.default_rng([7, 0]).standard_normal(4))
    expected_picks = [int(np.argmax(rounds[0] @ z))]
    for t in (1, 2):
        mu = (t * mu + rounds[t].mean(axis=0)) / (t + 1)
        z = (t * z + mimic_power_step(rounds[t], mu, z)) / (t + 1)
        z /= np.linalg.norm(z)
        expected_picks.append(int(np.argmax(rounds[t] @ z)))
    np.testing.assert_allclose(tracker.mean, mu)
    np.testing.assert_allclose(tracker.direction, z)
    assert picks == expected_picks and tracker.target == expected_picks[-1]


def test_fixed_mimic_copies_one_client_after_the_warm_up_whatever_the_rows_do():
    rng = np.random.default_rng(0)
    skew = rng.standard_normal((8, 50))
    labels = list(range(10, 18))
    tracker, dispatched, per_round = FixedMimic(), FixedMimic(), []
    for r in range(12):
        benign = 0.3 * skew + rng.standard_normal((8, 50))
        order = rng.permutation(8)  # rows arrive in any order; the target is a client, not a row
        index = tracker.choose(benign[order], [labels[i] for i in order], np.random.default_rng([0, r]))
        per_round.append((labels[order[index]], mimic_target_index(benign)))
        # The dispatcher with its own tracker, carried over the rounds, sends the same client's update.
        result = craft_malicious_updates("mimic-fixed", benign[order], 2, 10, rng=np.random.default_rng([0, r]),
                                         tracker=dispatched, labels=[labels[i] for i in order])
        np.testing.assert_array_equal(result, np.tile(benign[order[index]], (2, 1)))
        assert tracker.last_copied == dispatched.last_copied == labels[order[index]]
    copied = {label for label, _ in per_round}
    assert copied == {tracker.target}
    assert len({pick for _, pick in per_round}) > 1  # the per-round rule would have moved


def test_fixed_mimic_copies_the_best_match_when_its_target_is_absent_and_keeps_the_target():
    benign = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    tracker = FixedMimic()
    first = tracker.choose(benign, [3, 4, 5], np.random.default_rng(0))
    target = tracker.target
    assert target == [3, 4, 5][first]
    others = [label for label in (3, 4, 5) if label != target]
    without = benign[[i for i, label in enumerate((3, 4, 5)) if label != target]]
    index = tracker.choose(without, others, np.random.default_rng(1))
    assert index == int(np.argmax(without @ tracker.direction)) and tracker.target == target
    assert tracker.choose(benign, [3, 4, 5], np.random.default_rng(2)) == first


def test_fixed_mimic_state_round_trips_and_a_malformed_one_changes_nothing():
    benign = _spread_updates(seed=2, rows=6, dim=5)
    tracker = FixedMimic(warmup=2)
    tracker.choose(benign, list(range(6)), np.random.default_rng(0))
    resumed = FixedMimic(warmup=2)
    resumed.load_arrays(tracker.to_arrays())
    second = _spread_updates(seed=3, rows=6, dim=5)
    assert resumed.choose(second, list(range(6)), np.random.default_rng(1)) == \
        tracker.choose(second, list(range(6)), np.random.default_rng(1))
    np.testing.assert_array_equal(resumed.direction, tracker.direction)
    assert FixedMimic().to_arrays() == {}
    untouched = FixedMimic()
    for damaged in ({"mean": np.zeros(5)}, {**tracker.to_arrays(), "direction": np.full(5, np.nan)},
                    {**tracker.to_arrays(), "target": np.array(1.5)}):
        with pytest.raises(ValueError, match="mimic-fixed"):
            untouched.load_arrays(damaged)
        assert untouched.direction is None and untouched.rounds_seen == 0
    with pytest.raises(ValueError, match="warm-up"):
        FixedMimic(warmup=0)
    with pytest.raises(ValueError, match="tracker"):
        craft_malicious_updates("mimic-fixed", benign, 2, 8, rng=np.random.default_rng(0))


# --- jittered Sybils -------------------------------------------------------------------

def test_jitter_gives_each_copy_its_own_noise_scaled_to_the_benign_spread():
    benign = _spread_updates(seed=6, rows=8, dim=4000)
    benign[:, :10] = 0.25  # coordinates on which every honest client agrees: sigma = 0
    base = min_sum(benign, 3)
    jittered = craft_malicious_updates("min-sum-jitter", benign, 3, 10, rng=np.random.default_rng(1))
    assert jittered.shape == base.shape
    assert all(not np.array_equal(jittered[i], jittered[j]) for i in range(3) for j in range(i))
    sigma = benign.std(axis=0)
    np.testing.assert_array_equal(jittered[:, :10], base[:, :10])
    noise = (jittered[:, 10:] - base[:, 10:]) / sigma[10:]
    # Standard normal noise times DEFAULT_JITTER, per coordinate: mean ~0, std ~0.01.
    assert abs(noise.mean()) < 5e-4
    assert noise.std() == pytest.approx(colluding.DEFAULT_JITTER, rel=0.05)
    again = craft_malicious_updates("min-sum-jitter", benign, 3, 10, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(jittered, again)
    wider = craft_malicious_updates("min-sum", benign, 3, 10, rng=np.random.default_rng(1), jitter=0.1)
    assert ((wider - base)[:, 10:] / sigma[10:]).std() == pytest.approx(0.1, rel=0.05)
    np.testing.assert_array_equal(craft_malicious_updates("min-sum-jitter", benign, 3, 10, jitter=0.0), base)


def test_jitter_rejects_a_missing_generator_a_bad_scale_and_a_double_suffix():
    benign = _spread_updates(seed=7)
    with pytest.raises(ValueError, match="Generator"):
        craft_malicious_updates("alie-jitter", benign, 2, 8)
    with pytest.raises(ValueError, match="jitter"):
        jitter_copies(alie(benign, 2, 8), benign, np.random.default_rng(0), scale=-1.0)
    with pytest.raises(ValueError, match="jitter"):
        jitter_copies(alie(benign, 2, 8), benign, np.random.default_rng(0), scale=math.inf)
    for bad in ("min-sum-jitter-jitter", "-jitter", "krum-jitter", "mimic-jitter-0", "mimic-jitter--1",
                "mimic-jitter-inf", "mimic-jitter-x"):
        assert not is_colluding_attack(bad)
    assert colluding.parse_attack_name("mimic-jitter-0.3") == ("mimic", {"jitter": 0.3})
    assert colluding.parse_attack_name("ipm-0.1-jitter") == (
        "ipm", {"epsilon": 0.1, "jitter": colluding.DEFAULT_JITTER})


def test_jittered_copies_evade_the_identical_reply_rule_after_float32():
    # The copies a defense receives are float32 models, global + update: the jitter must
    # survive that rounding, or the attack would be the plain one.
    benign = _spread_updates(seed=8, rows=6, dim=300, scale=1e-3)
    global_model = np.random.default_rng(9).normal(size=300)
    for name, expected_groups in (("alie", 1), ("alie-jitter", 4)):
        crafted = craft_malicious_updates(name, benign, 4, 10, rng=np.random.default_rng(2))
        states = [{"w": torch.from_numpy(global_model + row).float()} for row in crafted]
        assert len(duplicate_groups(states)) == expected_groups


# --- the dispatcher --------------------------------------------------------------------

def test_dispatcher_knows_every_named_attack_and_rejects_others():
    benign = _spread_updates(seed=5)
    for name in colluding.COLLUDING_ATTACKS + ("ipm-2.5", "min-sum-sign", "min-max-unit", "mimic-jitter",
                                                "ipm-0.1-jitter", "min-max-sign-jitter"):
        assert is_colluding_attack(name)
        tracking = {"tracker": FixedMimic(), "labels": range(len(benign))} if name == "mimic-fixed" else {}
        result = craft_malicious_updates(name, benign, 2, 8, rng=np.random.default_rng(0), **tracking)
        assert result.shape == (2, 5) and np.isfinite(result).all()
    for bad in ("krum", "ipm-x", "ipm--1", "min-max-l2", "alie2", "mimic-fixed-0", "mimic-fixed-2.5",
                "mimic-fixed-x", "mimic-fixed-03", "mimic-fixed-3.0"):
        assert not is_colluding_attack(bad)
        with pytest.raises(ValueError, match="attack"):
            craft_malicious_updates(bad, benign, 2, 8)
    with pytest.raises(ValueError, match="finite"):
        alie(np.array([[1.0, math.nan]]), 1, 3)


# --- the harness, on hand-built replies ------------------------------------------------

class RecordingFedAvg(FedAvg):
    """FedAvg that keeps the replies its aggregate_train received."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = {}

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen[server_round] = replies
        return super().aggregate_train(server_round, replies)


def _state(seed, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(3, 4, generator=generator) + shift,
        "layer.bias": torch.randn(3, generator=generator, dtype=torch.float64) + shift,
        "norm.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


def _model_of(msg):
    return msg.content["arrays"].to_torch_state_dict()


def _flat_update(state, global_state):
    return np.concatenate([(state[k].double() - global_state[k].double()).ravel().numpy()
                           for k in ("layer.weight", "layer.bias")])


GLOBAL = _state(100)
PARTITIONS = range(6)
MALICIOUS = {4, 5}


def _round_replies():
    replies = [make_reply(p + 1, _state(p, shift=0.1 * p), partition=p) for p in PARTITIONS]
    return replies + [make_reply(9, error="client crashed")]


def _attacked(attack, replies=None, **kwargs):
    strategy = RecordingFedAvg()
    adversary = make_colluding(strategy, attack, MALICIOUS, seed=3, **kwargs)
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(list(range(1, 10)))))
    replies = _round_replies() if replies is None else replies
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, adversary, replies, arrays, metrics


def test_harness_rewrites_only_the_malicious_replies_the_defense_receives():
    strategy, adversary, sent, arrays, metrics = _attacked("ipm-100")
    seen = strategy.seen[1]
    assert len(seen) == len(sent)
    honest_updates = [_flat_update(_model_of(sent[p]), GLOBAL) for p in PARTITIONS if p not in MALICIOUS]
    expected = -100.0 * np.mean(honest_updates, axis=0)
    for position, (before, after) in enumerate(zip(sent, seen)):
        if before.has_error() or before.content["metrics"]["partition-id"] not in MALICIOUS:
            assert after is before  # honest and error replies reach the defense untouched
            continue
        assert after is not before
        received, original = _model_of(after), _model_of(before)
        # Same structure: keys and their order, dtypes, shapes, record names, metrics, metadata.
        assert list(received) == list(original)
        assert all(received[k].dtype == original[k].dtype and received[k].shape == original[k].shape
                   for k in original)
        assert list(after.content.keys()) == list(before.content.keys())
        assert dict(after.content["metrics"]) == dict(before.content["metrics"])
        assert after.metadata.src_node_id == before.metadata.src_node_id
        assert after.metadata.reply_to_message_id == before.metadata.reply_to_message_id
        # Only the floating arrays changed, to global + crafted update.
        assert torch.equal(received["norm.num_batches_tracked"], original["norm.num_batches_tracked"])
        np.testing.assert_allclose(_flat_update(received, GLOBAL), expected, rtol=1e-5, atol=1e-4)
        assert not torch.allclose(received["layer.weight"], original["layer.weight"])
        # The client's own message is not modified.
        assert torch.equal(_model_of(sent[position])["layer.weight"], original["layer.weight"])
    assert arrays is not None and metrics is not None  # FedAvg's consistency checks pass
    record = adversary.history[1]
    assert record.malicious == (4, 5) and record.benign_used == 4 and record.replies == 7


def test_partial_knowledge_uses_only_the_malicious_clients_own_updates():
    strategy, _, sent, _, _ = _attacked("ipm-0.1", knowledge="partial")
    own = [_flat_update(_model_of(sent[p]), GLOBAL) for p in sorted(MALICIOUS)]
    received = _model_of(strategy.seen[1][4])
    np.testing.assert_allclose(_flat_update(received, GLOBAL), -0.1 * np.mean(own, axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("attack", "warned"), [("alie", True), ("min-sum", True), ("ipm-0.1", False)])
def test_an_attack_with_one_known_update_to_spread_from_says_it_sends_it_unchanged(attack, warned, caplog):
    # Partial knowledge with one attacker replying: sigma and every pairwise distance are 0.
    replies = [reply for reply in _round_replies() if reply.has_error()
               or reply.content["metrics"]["partition-id"] != 5]
    with caplog.at_level("WARNING"):
        strategy, _, sent, _, _ = _attacked(attack, replies=replies, knowledge="partial")
    assert ("one known update" in caplog.text) == warned
    if warned:
        own = _flat_update(_model_of(sent[4]), GLOBAL)
        np.testing.assert_allclose(_flat_update(_model_of(strategy.seen[1][4]), GLOBAL), own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("malicious", [{4, 5}, {3, 4, 5}])
def test_alie_says_so_when_its_z_makes_the_crafted_update_the_honest_mean(malicious, caplog):
    # Six replies with content: z = Phi^-1((n-m-s)/(n-m)) is exactly 0 for m = 2 and 0.43 for m = 3.
    strategy = RecordingFedAvg()
    make_colluding(strategy, "alie", malicious, seed=3)
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(list(range(1, 10)))))
    sent = _round_replies()
    with caplog.at_level("WARNING"):
        strategy.aggregate_train(1, sent)
        strategy.aggregate_train(2, sent)
    honest = [_flat_update(_model_of(sent[p]), GLOBAL) for p in PARTITIONS if p not in malicious]
    crafted = _flat_update(_model_of(strategy.seen[1][max(malicious)]), GLOBAL)
    if len(malicious) == 2:
        assert caplog.text.count("the mean of the known updates, no deviation") == 1  # once, not every round
        np.testing.assert_allclose(crafted, np.mean(honest, axis=0), rtol=1e-5, atol=1e-6)
    else:
        assert "colluding alie" not in caplog.text
        assert not np.allclose(crafted, np.mean(honest, axis=0), rtol=1e-5, atol=1e-6)


def test_running_statistics_are_not_crafted_each_malicious_reply_keeps_its_own():
    # IPM-100 on a BatchNorm variance would send -100 times the honest mean change: below 0.
    def with_statistics(seed, shift=0.0):
        state = _state(seed, shift)
        state["norm.running_var"] = torch.full((3,), 1.0 - 0.1 * shift)
        return state

    global_state = with_statistics(100)
    strategy = RecordingFedAvg()
    make_colluding(strategy, "ipm-100", MALICIOUS, seed=3, statistics=["norm.running_var"])
    list(strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), StubGrid(list(range(1, 10)))))
    sent = [make_reply(p + 1, with_statistics(p, shift=0.1 * p), partition=p) for p in PARTITIONS]
    strategy.aggregate_train(1, sent)
    honest = [_flat_update(_model_of(sent[p]), global_state) for p in PARTITIONS if p not in MALICIOUS]
    for position in sorted(MALICIOUS):
        received, original = _model_of(strategy.seen[1][position]), _model_of(sent[position])
        assert torch.equal(received["norm.running_var"], original["norm.running_var"])
        np.testing.assert_allclose(_flat_update(received, global_state), -100.0 * np.mean(honest, axis=0),
                                   rtol=1e-5, atol=1e-4)


def test_harness_is_reproducible_whatever_order_the_replies_arrive_in():
    replies = _round_replies()
    shuffled = list(replies)
    random.Random(1).shuffle(shuffled)
    first, _, _, _, _ = _attacked("fang", replies)
    second, _, _, _, _ = _attacked("fang", shuffled)

    def malicious_models(seen):
        return {m.content["metrics"]["partition-id"]: _model_of(m) for m in seen
                if m.has_content() and m.content["metrics"]["partition-id"] in MALICIOUS}

    a, b = malicious_models(first.seen[1]), malicious_models(second.seen[1])
    assert all(torch.equal(a[p][k], b[p][k]) for p in MALICIOUS for k in a[p])
    assert not torch.equal(a[4]["layer.weight"], a[5]["layer.weight"])  # Fang draws per client


def test_a_round_without_malicious_replies_passes_everything_through():
    replies = [make_reply(p + 1, _state(p), partition=p) for p in range(4)]
    strategy, adversary, _, _, _ = _attacked("alie", replies)
    assert all(a is b for a, b in zip(strategy.seen[1], replies))
    assert adversary.history[1].malicious == ()


def _attacked_by(attack, malicious, replies, **kwargs):
    """What the defense receives from ``replies`` (Flower's FedAvg refuses an empty reply; the harness runs first)."""
    from flwr.serverapp.exception import InconsistentMessageReplies

    strategy = RecordingFedAvg()
    adversary = make_colluding(strategy, attack, malicious, seed=3, **kwargs)
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(list(range(1, 10)))))
    try:
        strategy.aggregate_train(1, replies)
    except InconsistentMessageReplies:
        pass
    return strategy.seen[1], adversary


def test_a_round_of_attackers_alone_is_attacked_from_their_own_updates(caplog):
    """Passed through unchanged, a sampled round of attackers alone would count as a round survived."""
    replies = [make_reply(p + 1, _state(p, shift=0.1 * p), partition=p) for p in range(4)]
    with caplog.at_level("WARNING"):
        seen, adversary = _attacked_by("ipm-100", set(range(4)), replies)
    own = np.mean([_flat_update(_model_of(reply), GLOBAL) for reply in replies], axis=0)
    for reply in seen:
        np.testing.assert_allclose(_flat_update(_model_of(reply), GLOBAL), -100.0 * own, rtol=1e-5, atol=1e-4)
    assert adversary.history[1].malicious == (0, 1, 2, 3)
    assert "every client this round is malicious" in caplog.text
    # ALIE's z = Phi^-1((n-m-s)/(n-m)) has no value at n = m: those replies go as trained, and the log says why.
    seen, adversary = _attacked_by("alie", set(range(4)), replies)
    assert all(a is b for a, b in zip(seen, replies))
    assert adversary.history[1].malicious == () and "ALIE's z needs n > m" in adversary.history[1].skipped_reason
    # Mimic copies an honest client: with none, nothing is copied, and mimic-fixed's warm-up does not
    # take the attackers' own updates (it would follow one of them for good).
    for attack in ("mimic", "mimic-fixed"):
        seen, adversary = _attacked_by(attack, set(range(4)), replies)
        assert all(a is b for a, b in zip(seen, replies))
        assert "no honest client to copy" in adversary.history[1].skipped_reason
    assert adversary.mimic_tracker.rounds_seen == 0


def test_replies_without_a_finite_model_do_not_count_among_the_replies_alie_hides_in():
    from flwr.app import Message, RecordDict

    replies = [make_reply(p + 1, _state(p, shift=0.1 * p), partition=p) for p in PARTITIONS]
    # Two clients' own failure replies: content, but no model the defense could average.
    empty = [Message(RecordDict({}), reply_to=make_reply(node, error="unused")) for node in (7, 8)]
    seen, _ = _attacked_by("alie", {3, 4, 5}, replies + empty)
    honest = np.array([_flat_update(_model_of(replies[p]), GLOBAL) for p in range(3)])
    expected = honest.mean(axis=0) + alie_z(3, 6) * honest.std(axis=0)
    np.testing.assert_allclose(_flat_update(_model_of(seen[5]), GLOBAL), expected, rtol=1e-5, atol=1e-6)
    # Nor does a non-finite model, which the defense's screen rejects: n = 2 honest + 3 malicious.
    broken = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in _state(2).items()}
    replies[2] = make_reply(3, broken, partition=2)
    seen, _ = _attacked_by("alie", {3, 4, 5}, replies)
    honest = honest[:2]
    expected = honest.mean(axis=0) + alie_z(3, 5) * honest.std(axis=0)
    np.testing.assert_allclose(_flat_update(_model_of(seen[5]), GLOBAL), expected, rtol=1e-5, atol=1e-6)


def test_a_rewritten_reply_keeps_a_deployment_reply_s_content_hash_as_its_id():
    """A SuperNode ids its reply by the content's hash; a rewritten reply must too, or its id gives it away."""
    replies = _round_replies()
    for reply in replies:
        reply.metadata.__dict__["_message_id"] = reply.object_id
    seen, _ = _attacked_by("ipm-100", MALICIOUS, replies)
    rewritten = [after for before, after in zip(replies, seen) if after is not before]
    assert len(rewritten) == len(MALICIOUS)
    assert all(reply.metadata.message_id == reply.object_id for reply in seen)


def test_harness_mimic_fixed_copies_one_client_every_round_and_resumes_from_its_checkpoint(caplog):
    def play(adversary, server_round):
        strategy = RecordingFedAvg()
        adversary.attach(strategy)
        replies = [make_reply(p + 1, _state(10 * server_round + p, shift=0.3 * p), partition=p) for p in PARTITIONS]
        list(strategy.configure_train(server_round, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(list(range(1, 7)))))
        strategy.aggregate_train(server_round, replies)
        adversary.detach()
        sent = {m.content["metrics"]["partition-id"]: _model_of(m) for m in replies}
        seen = {m.content["metrics"]["partition-id"]: _model_of(m) for m in strategy.seen[server_round]}
        copied = [p for p in PARTITIONS if p not in MALICIOUS
                  and all(torch.allclose(seen[4][k], sent[p][k]) for k in ("layer.weight", "layer.bias"))]
        return copied

    straight = ColludingAdversary("mimic-fixed-2", MALICIOUS, seed=3)
    copied = [play(straight, r) for r in range(1, 6)]
    assert all(len(c) == 1 for c in copied) and len({c[0] for c in copied[1:]}) == 1
    target = straight.mimic_tracker.target
    assert copied[-1] == [target]
    assert [straight.history[r].copied for r in range(1, 6)] == [c[0] for c in copied]
    assert f"copying partition {target}" in caplog.text

    # Stopped in the middle of a three-round warm-up: the running mean and direction carry over.
    uninterrupted = ColludingAdversary("mimic-fixed-3", MALICIOUS, seed=3)
    picks = [play(uninterrupted, r) for r in range(1, 6)]
    after_one = ColludingAdversary("mimic-fixed-3", MALICIOUS, seed=3)
    play(after_one, 1)
    restarted = ColludingAdversary("mimic-fixed-3", MALICIOUS, seed=3)
    restarted.restore_checkpoint_arrays(after_one.checkpoint_arrays())
    assert [play(restarted, r) for r in range(2, 6)] == picks[1:]
    for name in ("mean", "direction"):
        np.testing.assert_array_equal(getattr(restarted.mimic_tracker, name),
                                      getattr(uninterrupted.mimic_tracker, name))
    fresh = ColludingAdversary("mimic-fixed-3", MALICIOUS, seed=3)
    play(fresh, 2)
    assert not np.array_equal(fresh.mimic_tracker.direction, uninterrupted.mimic_tracker.direction)

    after_two = ColludingAdversary("mimic-fixed-2", MALICIOUS, seed=3)
    play(after_two, 1), play(after_two, 2)
    saved = after_two.checkpoint_arrays()
    resumed = ColludingAdversary("mimic-fixed-2", MALICIOUS, seed=3)
    resumed.restore_checkpoint_arrays(saved)
    assert [play(resumed, r) for r in (3, 4, 5)] == copied[2:]
    # A damaged state is logged and the warm-up starts over rather than the run failing.
    damaged = ColludingAdversary("mimic-fixed", MALICIOUS, seed=3)
    damaged.restore_checkpoint_arrays({**saved, "direction": np.zeros(3)})
    assert damaged.mimic_tracker.rounds_seen == 0 and "starts over" in caplog.text
    assert ColludingAdversary("alie", MALICIOUS).checkpoint_arrays() == {}


def test_harness_mimic_fixed_never_follows_a_reply_without_a_partition_id():
    strategy = RecordingFedAvg()
    adversary = make_colluding(strategy, "mimic-fixed", MALICIOUS, seed=3)
    # The honest reply most extreme along any direction carries no partition id.
    replies = [make_reply(p + 1, _state(p, shift=0.1 * p), partition=p) for p in PARTITIONS]
    replies.append(make_reply(20, _state(50, shift=30.0)))
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(list(range(1, 21)))))
    # Called directly: FedAvg would refuse replies whose metrics differ in keys.
    adversary.rewrite(1, replies)
    assert adversary.history[1].copied in set(PARTITIONS) - MALICIOUS
    assert adversary.history[1].benign_used == 4
    # With no labelled honest reply there is no one to follow: the round passes through.
    only_unlabelled = [make_reply(20, _state(50)), make_reply(21, _state(51))] + \
        [make_reply(p + 1, _state(p), partition=p) for p in sorted(MALICIOUS)]
    passed = adversary.rewrite(2, only_unlabelled)
    assert adversary.history[2].malicious == () and "partition" in adversary.history[2].skipped_reason
    assert all(a is b for a, b in zip(passed, only_unlabelled))


def test_attach_keeps_the_strategy_and_detach_restores_it(honest_candidates, digits_task):
    from softmerge.aggregation import SoftMergeConfig
    from softmerge.server.strategy import SoftMerge

    model, locals_ = honest_candidates
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=10))
    adversary = make_colluding(strategy, "min-max", {7, 8, 9}, seed=0)
    assert isinstance(strategy, SoftMerge) and strategy.configure_train.__name__ == "configure_train"
    global_arrays = ArrayRecord(model.state_dict())
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), StubGrid(list(range(1, 11)))))
    assert strategy._global_state is not None  # SoftMerge's own configure_train still ran
    replies = [make_reply(p + 1, locals_[p], partition=p) for p in range(10)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["softmerge-candidates"] == 11 and metrics["softmerge-excluded"] == 0
    assert strategy.reports[1].candidates[-4:-1] == ["client-7", "client-8", "client-9"]
    # Min-max sends one crafted model from every malicious client: it is gated once.
    assert strategy.reports[1].duplicates == [["client-7", "client-8", "client-9"]]
    assert metrics["softmerge-duplicates"] == 2
    assert adversary.history[1].malicious == (7, 8, 9)

    adversary.detach()
    assert "configure_train" not in vars(strategy) and "aggregate_train" not in vars(strategy)
    with pytest.raises(ValueError, match="unknown colluding attack"):
        ColludingAdversary("label-flip", {1})
    with pytest.raises(RuntimeError, match="configure_train"):
        ColludingAdversary("alie", {1}).rewrite(1, replies)


def test_jittered_copies_get_a_gate_each_unless_near_identical_replies_are_grouped(honest_candidates, digits_task):
    from softmerge.aggregation import SoftMergeConfig
    from softmerge.server.strategy import SoftMerge

    model, locals_ = honest_candidates
    grouped = {}
    for tolerance in (0.0, 0.1):
        strategy = SoftMerge(model, digits_task.gate.tensors(),
                             SoftMergeConfig(steps=10, near_duplicate_tolerance=tolerance))
        make_colluding(strategy, "mimic-jitter", {6, 7, 8, 9}, seed=0)
        list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(),
                                      StubGrid(list(range(1, 11)))))
        _, metrics = strategy.aggregate_train(1, [make_reply(p + 1, locals_[p], partition=p) for p in range(10)])
        grouped[tolerance] = (strategy.reports[1].duplicates, metrics["softmerge-duplicates"])
    # Exact grouping sees no two identical replies; grouping by behaviour puts the four
    # copies with the honest client they copy (Mimic's target is one of clients 0-5).
    assert grouped[0.0] == ([], 0)
    (group,), count = grouped[0.1]
    assert count == 4 and group[-4:] == ["client-6", "client-7", "client-8", "client-9"]
    assert len(group) == 5 and group[0] in {f"client-{p}" for p in range(6)}


# --- end to end through Flower's simulation engine -------------------------------------

def _recording(method, sink):
    def aggregate_train(server_round, replies):
        replies = list(replies)
        sink.append(replies)
        return method(server_round, replies)
    return aggregate_train


@pytest.mark.slow
def test_omniscient_attack_changes_what_the_defense_receives_in_a_real_run():
    """Digits, 4 clients, partition 3 malicious (trains honestly), IPM-100 in front of SoftMerge."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from softmerge.client.app import make_client_app
    from softmerge.server.strategies import build_strategy
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.engine import backend_config
    from softmerge.simulations.tasks import build_model, load_task

    settings = parse_run_config({"num-server-rounds": 1, "attack": "none", "malicious-partitions": "3",
                                 "local-epochs": 1, "softmerge-steps": 10, "output-dir": ""})
    arrived, defended, outcome = [], [], {}
    app = ServerApp()

    @app.main()
    def main(grid, context):
        try:
            task = load_task(settings.dataset, settings.server_gate_size, settings.server_test_size, settings.seed,
                             settings.dataset_path)
            model = build_model(settings.dataset, seed=settings.seed)
            strategy = build_strategy(settings, model, task.gate.tensors())
            # Recorders on both sides of the adversary: what clients sent, what the defense got.
            strategy.aggregate_train = _recording(strategy.aggregate_train, defended)
            outcome["adversary"] = make_colluding(strategy, "ipm-100", settings.malicious_ids, seed=settings.seed)
            strategy.aggregate_train = _recording(strategy.aggregate_train, arrived)
            outcome["global"] = model.state_dict()
            strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=1,
                           train_config=ConfigRecord({"seed": settings.seed}))
            outcome["reports"] = strategy.reports
        except Exception as error:  # noqa: BLE001  (surfaced by the assertion below)
            outcome["error"] = repr(error)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's accelerator notice
        run_simulation(server_app=app, client_app=make_client_app(settings), num_supernodes=4,
                       backend_config=backend_config())

    assert "error" not in outcome, outcome.get("error")
    (sent,), (received,) = arrived, defended
    by_partition = lambda replies: {int(m.content["metrics"]["partition-id"]): m for m in replies}  # noqa: E731
    sent, received = by_partition(sent), by_partition(received)
    assert sorted(sent) == sorted(received) == [0, 1, 2, 3]
    global_state = outcome["global"]

    def update(msg):
        state = _model_of(msg)
        return torch.cat([(state[k].double() - global_state[k].double()).ravel() for k in global_state])

    for partition in (0, 1, 2):
        assert received[partition] is sent[partition]
    honest_mean = torch.stack([update(sent[p]) for p in (0, 1, 2)]).mean(dim=0)
    assert not torch.allclose(update(received[3]), update(sent[3]))
    torch.testing.assert_close(update(received[3]), -100.0 * honest_mean, rtol=1e-4, atol=1e-3)
    assert outcome["adversary"].history[1].malicious == (3,)
    assert "client-3" in outcome["reports"][1].candidates  # the defense merged what it received


# --- the adaptive backdoor: moved as far as the attacker's clean loss allows -------------

@pytest.mark.parametrize("threshold, expected", [
    (16.0, 4.0), (2.0, math.sqrt(2.0)),  # gamma = 1 passes: bisection on log gamma in [1, 10]
    (400.0, 10.0),  # even the cap passes
    (0.25, 0.5), (0.0, 0.0),  # gamma = 1 fails: bisection on gamma in [0, 1]
])
def test_largest_scale_finds_where_the_loss_crosses_the_threshold(threshold, expected):
    # loss(gamma) = gamma^2: the boundary is sqrt(threshold), clipped to [0, 10].
    gamma = colluding.largest_scale_within(lambda g: g * g, threshold, upper=10.0, iterations=30)
    assert gamma * gamma <= threshold
    assert gamma == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_largest_scale_treats_a_non_finite_loss_as_too_large():
    loss = lambda g: 0.0 if g <= 3.0 else math.nan  # noqa: E731
    assert colluding.largest_scale_within(loss, 1.0, upper=50.0, iterations=30) == pytest.approx(3.0, rel=1e-6)
    assert colluding.largest_scale_within(lambda g: math.inf, 1.0, upper=50.0) == 0.0
    with pytest.raises(ValueError, match="largest scale"):
        colluding.largest_scale_within(lambda g: 0.0, 1.0, upper=0.5)


def test_backdoor_evade_needs_the_harness_and_its_loss_oracle():
    assert is_colluding_attack("backdoor-evade")
    with pytest.raises(ValueError, match="harness"):
        craft_malicious_updates("backdoor-evade", SMALL, 1, 4)
    with pytest.raises(ValueError, match="pass loss_of"):
        ColludingAdversary("backdoor-evade", MALICIOUS)
    with pytest.raises(ValueError, match="no copies to jitter"):
        colluding.parse_attack_name("backdoor-evade-jitter")
    assert colluding.parse_attack_name("backdoor-evade-1") == ("backdoor-evade", {"quantile": 1.0})
    assert colluding.is_adaptive_attack("backdoor-evade-0.9") and not colluding.is_adaptive_attack("mimic")
    for bad in ("backdoor-evade-2", "backdoor-evade-x", "backdoor-evade-"):
        with pytest.raises(ValueError, match="quantile"):
            colluding.parse_attack_name(bad)


def _squared_distance_from(center):
    """A stand-in for the clean loss: grows with the distance from ``center``, like a real one near a good model."""
    def loss_of(state):
        return float(sum(((torch.as_tensor(state[k]).double() - center[k].double()) ** 2).sum()
                         for k in ("layer.weight", "layer.bias")))
    return loss_of


def _scaled_state(seed, scale):
    noise = _state(seed)
    return {k: (GLOBAL[k] + scale * noise[k].to(GLOBAL[k].dtype)) if GLOBAL[k].is_floating_point() else noise[k]
            for k in GLOBAL}


@pytest.mark.parametrize("malicious_scales, beyond_own", [((0.5, 0.8), True), ((3.0, 6.0), False)])
def test_backdoor_evade_moves_each_own_update_to_the_median_honest_loss(malicious_scales, beyond_own):
    # Honest updates of about 1x to 4x a unit noise. Near ones (0.5x, 0.8x) can move past
    # themselves (gamma > 1); far ones (3x, 6x) are pulled toward the honest mean (gamma < 1).
    scales = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: malicious_scales[0], 5: malicious_scales[1]}
    replies = [make_reply(p + 1, _scaled_state(p, scales[p]), partition=p) for p in PARTITIONS]
    loss_of = _squared_distance_from(GLOBAL)
    strategy, adversary, sent, _, _ = _attacked("backdoor-evade", replies, loss_of=loss_of)
    honest = [_flat_update(_model_of(sent[p]), GLOBAL) for p in (0, 1, 2, 3)]
    threshold = float(np.median([h @ h for h in honest]))
    mean = np.mean(honest, axis=0)
    record = adversary.history[1]
    assert record.malicious == (4, 5) and len(record.scales) == 2
    for position, partition in enumerate((4, 5)):
        own = _flat_update(_model_of(sent[partition]), GLOBAL)
        received = _flat_update(_model_of(strategy.seen[1][partition]), GLOBAL)
        gamma = record.scales[position]
        assert (gamma > 1.0) == beyond_own and 0.0 < gamma < len(sent)
        # The own update moved from the honest mean, nothing else ...
        np.testing.assert_allclose(received, mean + gamma * (own - mean), rtol=1e-4, atol=1e-4)
        # ... to just inside the honest median loss, within the bisection's step.
        assert received @ received <= threshold * 1.001
        further = mean + gamma * 1.01 * (own - mean)
        assert further @ further > threshold
    for partition in (0, 1, 2, 3):
        assert strategy.seen[1][partition] is sent[partition]


def test_backdoor_evade_bounds_each_reply_as_sent_with_its_own_running_statistics():
    """A BatchNorm model's loss reads its running statistics, which every reply sends as its client trained them."""
    base = {"layer.weight": GLOBAL["layer.weight"], "layer.bias": GLOBAL["layer.bias"],
            "norm.running_var": torch.ones(3)}
    variance = {0: 1.0, 1: 1.2, 2: 1.4, 3: 1.6, 4: 1.8, 5: 0.5}  # the attackers' own are far from the global's

    def state(p):
        noise = _state(p)
        return {"layer.weight": base["layer.weight"] + 0.5 * noise["layer.weight"],
                "layer.bias": base["layer.bias"] + 0.5 * noise["layer.bias"].to(base["layer.bias"].dtype),
                "norm.running_var": torch.full((3,), variance[p])}

    distance = _squared_distance_from(base)

    def loss_of(model_state):  # a clean loss that also reads the statistics, as a BatchNorm model's does
        return distance(model_state) + float(np.abs(np.asarray(model_state["norm.running_var"]) - 1.0).sum())

    strategy = RecordingFedAvg()
    adversary = make_colluding(strategy, "backdoor-evade", MALICIOUS, seed=3, loss_of=loss_of,
                               statistics=["norm.running_var"])
    list(strategy.configure_train(1, ArrayRecord(base), ConfigRecord(), StubGrid(list(range(1, 7)))))
    replies = [make_reply(p + 1, state(p), partition=p) for p in PARTITIONS]
    strategy.aggregate_train(1, replies)
    threshold = float(np.median([loss_of(_model_of(replies[p])) for p in (0, 1, 2, 3)]))
    assert all(gamma > 0 for gamma in adversary.history[1].scales)
    for partition in (4, 5):
        received = _model_of(strategy.seen[1][partition])
        assert torch.equal(received["norm.running_var"], torch.full((3,), variance[partition]))
        # Within the bound as sent, and not far inside it: the search used the statistics it sends.
        assert threshold * 0.95 < loss_of(received) <= threshold * 1.001


def test_backdoor_evade_with_quantile_one_goes_as_far_as_the_worst_honest_reply():
    scales = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 0.5, 5: 0.8}
    replies = [make_reply(p + 1, _scaled_state(p, scales[p]), partition=p) for p in PARTITIONS]
    loss_of = _squared_distance_from(GLOBAL)
    median_run = _attacked("backdoor-evade", replies, loss_of=loss_of)
    worst_run = _attacked("backdoor-evade-1", replies, loss_of=loss_of)
    worst_honest = max(loss_of(_model_of(replies[p])) for p in (0, 1, 2, 3))
    for partition, median_scale, worst_scale in zip((4, 5), median_run[1].history[1].scales,
                                                     worst_run[1].history[1].scales):
        assert worst_scale > median_scale
        received = loss_of(_model_of(worst_run[0].seen[1][partition]))
        assert worst_honest * 0.95 < received <= worst_honest * 1.001


def test_backdoor_evade_sends_the_honest_mean_for_a_non_finite_own_update():
    scales = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 0.5, 5: 0.8}
    states = {p: _scaled_state(p, scales[p]) for p in PARTITIONS}
    states[4]["layer.weight"][0, 0] = float("nan")
    replies = [make_reply(p + 1, states[p], partition=p) for p in PARTITIONS]
    strategy, adversary, sent, _, _ = _attacked("backdoor-evade", replies, loss_of=_squared_distance_from(GLOBAL))
    honest_mean = np.mean([_flat_update(_model_of(sent[p]), GLOBAL) for p in (0, 1, 2, 3)], axis=0)
    np.testing.assert_allclose(_flat_update(_model_of(strategy.seen[1][4]), GLOBAL), honest_mean, rtol=1e-5, atol=1e-5)
    assert adversary.history[1].scales[0] == 0.0 and adversary.history[1].scales[1] > 0.0


def test_backdoor_evade_bounds_by_the_finite_honest_losses_only():
    scales = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 0.5, 5: 0.8}
    replies = [make_reply(p + 1, _scaled_state(p, scales[p]), partition=p) for p in PARTITIONS]
    distance = _squared_distance_from(GLOBAL)
    largest = distance(_model_of(replies[3]))

    def loss_of(state):  # the farthest honest reply scores inf, as a diverged model would
        loss = distance(state)
        return math.inf if math.isclose(loss, largest) else loss

    strategy, adversary, sent, _, _ = _attacked("backdoor-evade-1", replies, loss_of=loss_of)
    finite_worst = max(distance(_model_of(replies[p])) for p in (0, 1, 2))
    for partition in (4, 5):
        assert distance(_model_of(strategy.seen[1][partition])) <= finite_worst * 1.001
    assert all(0.0 < scale < len(sent) for scale in adversary.history[1].scales)


def test_backdoor_evade_with_partial_knowledge_and_one_attacker_sends_its_update_unmoved():
    scales = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 0.5, 5: 0.8}
    replies = [make_reply(p + 1, _scaled_state(p, scales[p]), partition=p) for p in PARTITIONS]
    strategy = RecordingFedAvg()
    adversary = make_colluding(strategy, "backdoor-evade", {5}, seed=3, knowledge="partial",
                               loss_of=_squared_distance_from(GLOBAL))
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(list(range(1, 10)))))
    strategy.aggregate_train(1, replies)
    assert adversary.history[1].scales == (1.0,)
    np.testing.assert_allclose(_flat_update(_model_of(strategy.seen[1][5]), GLOBAL),
                               _flat_update(_model_of(replies[5]), GLOBAL), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("params, message", [({"uper": 3}, "takes quantile"), ({"quantile": 1.5}, "quantile=1.5"),
                                             ({"upper": 0.5}, "upper=0.5"), ({"iterations": 0}, "iterations=0")])
def test_backdoor_evade_rejects_unknown_or_out_of_range_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        ColludingAdversary("backdoor-evade", MALICIOUS, loss_of=_squared_distance_from(GLOBAL), **params)


def test_clean_loss_oracle_scores_a_state_like_evaluate_model_and_leaves_it_alone(digits_task):
    from softmerge.simulations.harness import clean_loss_oracle
    from softmerge.simulations.tasks import attacker_sample, build_model, evaluate_model

    sample = attacker_sample(digits_task, 100, seed=0)
    reference = build_model("digits", seed=1)
    state = {name: tensor.numpy().copy() for name, tensor in reference.state_dict().items()}
    before = {name: array.copy() for name, array in state.items()}
    loss_of = clean_loss_oracle(build_model("digits", seed=2), sample)
    assert loss_of(state) == pytest.approx(evaluate_model(reference, sample)[0], rel=1e-6)
    assert all(np.array_equal(state[name], before[name]) for name in state)
    first_weight = next(name for name, array in state.items() if array.ndim > 1)
    state[first_weight] += 1.0  # another model, another loss
    assert loss_of(state) != pytest.approx(evaluate_model(reference, sample)[0], rel=1e-6)


def test_backdoor_evade_says_so_when_even_the_honest_mean_is_above_the_bound(caplog):
    scales = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 0.5, 5: 0.8}
    replies = [make_reply(p + 1, _scaled_state(p, scales[p]), partition=p) for p in PARTITIONS]
    # The loss is the distance from honest reply 0, and quantile 0 bounds by its loss, 0: only
    # that very model passes, so no blend and not the honest mean does.
    loss_of = _squared_distance_from(_model_of(replies[0]))
    with caplog.at_level("INFO"):
        strategy, adversary, sent, _, _ = _attacked("backdoor-evade-0", replies, loss_of=loss_of)
    assert adversary.history[1].scales == (0.0, 0.0)
    assert "even the known mean's clean loss is above the bound" in caplog.text
    honest_mean = np.mean([_flat_update(_model_of(sent[p]), GLOBAL) for p in (0, 1, 2, 3)], axis=0)
    np.testing.assert_allclose(_flat_update(_model_of(strategy.seen[1][4]), GLOBAL), honest_mean, rtol=1e-5, atol=1e-5)
