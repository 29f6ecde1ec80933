"""Near-identical replies, judged by what they do on the gate split, share one gate (opt-in)."""

import math

import numpy as np
import pytest
import torch

from softmerge.aggregation import SoftMergeConfig, soft_merge
from softmerge.aggregation.merge import mean_state, near_duplicate_clusters
from softmerge.simulations.colluding import jitter_copies
from softmerge.simulations.config import parse_run_config


def test_clusters_join_a_leader_within_the_tolerance_of_how_far_both_moved():
    keep = torch.zeros(4, dtype=torch.float64)
    a = torch.ones(4, dtype=torch.float64)  # moved rms 1 from the keep model
    near_a = a + 0.05  # rms 0.05 from a: within 0.1 x min(1, 1.05)
    unlike = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # moved 1, but rms sqrt(2) from a
    assert near_duplicate_clusters([a, None, unlike, near_a], keep, 0.1) == [[0, 3], [1], [2]]
    # A smaller tolerance separates them.
    assert near_duplicate_clusters([a, None, unlike, near_a], keep, 0.01) == [[0], [1], [2], [3]]


def test_clusters_compare_with_the_leader_only_so_no_chain_links_unlike_candidates():
    keep = torch.zeros(3, dtype=torch.float64)
    a = torch.ones(3, dtype=torch.float64)
    # b is 0.09 from a (joins), c is 0.09 from b but 0.18 from a: it leads its own cluster.
    b, c = a + 0.09, a + 0.18
    assert near_duplicate_clusters([a, b, c], keep, 0.1) == [[0, 1], [2]]


def test_models_that_do_not_move_or_are_not_finite_never_cluster():
    keep = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert near_duplicate_clusters([keep.clone(), keep.clone()], keep, 0.5) == [[0], [1]]
    broken = torch.tensor([math.inf, 1.0], dtype=torch.float64)
    assert near_duplicate_clusters([broken, broken.clone()], keep, 0.5) == [[0], [1]]
    with pytest.raises(ValueError, match="tolerance"):
        near_duplicate_clusters([keep], keep, -0.1)


def test_mean_state_averages_floating_tensors_and_keeps_the_first_counter():
    first = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    second = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(9)}
    mean = mean_state([first, second])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and mean["w"].dtype == torch.float32
    assert torch.equal(mean["steps"], torch.tensor(3))


def _jittered_copies(candidates, source, copies, scale, seed=0):
    """``copies`` models equal to ``candidates[source]`` plus per-copy noise of ``scale`` x the honest spread."""
    keys = [k for k, v in candidates[source].items() if v.dtype.is_floating_point]
    flat = np.stack([np.concatenate([c[k].double().numpy().ravel() for k in keys]) for c in candidates])
    noisy = jitter_copies(np.tile(flat[source], (copies, 1)), flat, np.random.default_rng(seed), scale)
    result = []
    for row in noisy:
        state, offset = dict(candidates[source]), 0
        for k in keys:
            size = state[k].numel()
            state[k] = torch.from_numpy(row[offset:offset + size]).reshape(state[k].shape).to(state[k].dtype)
            offset += size
        result.append(state)
    return result


def test_jittered_copies_share_the_gate_of_the_model_they_copy(honest_candidates, digits_task):
    model, candidates = honest_candidates
    copies = _jittered_copies(candidates, 0, 4, scale=0.01)
    labels = [f"honest-{k}" for k in range(len(candidates))] + [f"copy-{k}" for k in range(4)]
    validation = digits_task.gate.tensors()

    _, exact_only = soft_merge(model, candidates + copies, validation, SoftMergeConfig(steps=10), labels=labels)
    assert exact_only.duplicates == []  # no two of them are bit-for-bit identical

    config = SoftMergeConfig(steps=10, near_duplicate_tolerance=0.1)
    merged, report = soft_merge(model, candidates + copies, validation, config, labels=labels)
    # The copies join the client they copy, and no two honest clients are grouped.
    assert report.duplicates == [["honest-0", "copy-0", "copy-1", "copy-2", "copy-3"]]
    group = [0] + list(range(len(candidates), len(candidates) + 4))
    for gates, weights in zip(report.gates, report.weights):
        assert len({gates[k] for k in group}) == 1 and len({weights[k] for k in group}) == 1
        assert sum(weights) == pytest.approx(1.0)
    assert all(torch.isfinite(t).all() for t in merged.values() if t.dtype.is_floating_point)


def test_honest_clients_alone_are_not_grouped(honest_candidates, digits_task):
    model, candidates = honest_candidates
    config = SoftMergeConfig(steps=0, near_duplicate_tolerance=0.1)
    _, report = soft_merge(model, candidates, digits_task.gate.tensors(), config)
    assert report.duplicates == []


def test_a_group_of_near_copies_is_gated_as_their_mean(honest_candidates, digits_task):
    model, candidates = honest_candidates
    copies = _jittered_copies(candidates, 3, 2, scale=0.01, seed=5)
    # Only the copies and their source: with the keep model anchored and every gate shared
    # by one group, the merge is the group's model, the mean of the three.
    config = SoftMergeConfig(steps=0, near_duplicate_tolerance=0.1, harm_margin=0.0)
    merged, report = soft_merge(model, [candidates[3]] + copies, digits_task.gate.tensors(), config)
    assert report.duplicates == [["candidate-0", "candidate-1", "candidate-2"]]
    expected = mean_state([candidates[3]] + copies)
    for name, tensor in merged.items():
        if tensor.dtype.is_floating_point:
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)


def test_the_tolerance_is_checked_and_reaches_the_merge_from_the_run_config():
    from softmerge.server.strategies import merge_config_from

    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="near_duplicate_tolerance"):
            SoftMergeConfig(near_duplicate_tolerance=bad)
    assert merge_config_from(parse_run_config({"softmerge-near-duplicates": 0.1})).near_duplicate_tolerance == 0.1
    assert SoftMergeConfig().near_duplicate_tolerance == 0.0


def test_the_keep_candidate_still_leads_its_group_when_near_copies_are_grouped(honest_candidates, digits_task):
    model, candidates = honest_candidates
    resent = {k: v.clone() for k, v in model.state_dict().items()}  # a client that resent the global model
    copies = _jittered_copies(candidates, 0, 2, scale=0.01)
    states = candidates[:4] + [resent] + copies
    labels = ["c0", "c1", "c2", "c3", "resent", "copy-0", "copy-1"]
    # One column per candidate and the keep model last, all different, so a start read from
    # the wrong column shows.
    start = torch.tensor([[0.1 * (k + 1) for k in range(len(states) + 1)]])
    config = SoftMergeConfig(steps=0, keep_mode="candidate", near_duplicate_tolerance=0.1)
    _, report = soft_merge(model, states, digits_task.gate.tensors(), config, labels=labels, initial_log_alpha=start)
    assert sorted(report.duplicates) == sorted([["c0", "copy-0", "copy-1"], ["keep", "resent"]])
    keep_column = report.candidates.index("keep")
    assert report.log_alpha[0][keep_column] == pytest.approx(float(start[0, -1]))
    assert report.log_alpha[0][labels.index("resent")] == pytest.approx(float(start[0, -1]))


def test_a_group_of_near_copies_is_only_as_trusted_as_its_least_trusted_member(honest_candidates, digits_task):
    model, candidates = honest_candidates
    copies = _jittered_copies(candidates, 0, 2, scale=0.01)
    trust = [1.0] * len(candidates) + [0.0, 0.0]
    config = SoftMergeConfig(steps=0, near_duplicate_tolerance=0.1)
    _, report = soft_merge(model, candidates + copies, digits_task.gate.tensors(), config, trust=trust)
    group = [0, len(candidates), len(candidates) + 1]
    assert [report.trust[k] for k in group] == [0.0, 0.0, 0.0]
    assert all(report.trust[k] == 1.0 for k in range(1, len(candidates)))
    # Bit-identical copies keep the most trusted sender's trust.
    exact = [{k: v.clone() for k, v in candidates[0].items()}]
    _, report = soft_merge(model, candidates + exact, digits_task.gate.tensors(), SoftMergeConfig(steps=0),
                           trust=[1.0] * len(candidates) + [0.0])
    assert report.trust[0] == report.trust[len(candidates)] == 1.0  # (the keep model, last, is neutral)
