"""keep_mode="anchor": the global model is a fallback and the retry's start, not a share of the merge."""

import pytest
import torch

import softmerge.aggregation.merge as merge_module
from softmerge.aggregation import SoftMergeConfig, soft_merge
from softmerge.simulations.config import ConfigError, parse_run_config
from softmerge.server.strategies import merge_config_from


def _noisy(state, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) if v.dtype.is_floating_point else v.clone()
            for k, v in state.items()}


def test_honest_clients_share_the_whole_merge_and_the_keep_model_none(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    gate = digits_task.gate.tensors()

    _, as_candidate = soft_merge(model, locals_[:6], gate, SoftMergeConfig(steps=30, keep_mode="candidate"))
    _, as_anchor = soft_merge(model, locals_[:6], gate, SoftMergeConfig(steps=30, keep_mode="anchor"))

    assert as_candidate.weights[0][-1] > 0  # the keep model is usually the best start
    assert as_anchor.weights[0][-1] == 0.0 and as_anchor.gates[0][-1] == 0.0
    assert sum(as_anchor.weights[0][:-1]) == pytest.approx(1.0)
    assert as_anchor.rejected_loss is None


def test_the_keep_gate_is_never_sampled_open_in_the_first_attempt(honest_candidates, digits_task, monkeypatch):
    model, locals_ = honest_candidates
    seen = []
    learn = merge_module._learn_gates

    def spy(model_, stacked, log_alpha, inputs, targets, config, keep_index, ceiling=None):
        seen.append((log_alpha.detach().clone(), None if ceiling is None else ceiling.clone(), keep_index))
        return learn(model_, stacked, log_alpha, inputs, targets, config, keep_index, ceiling)
    monkeypatch.setattr(merge_module, "_learn_gates", spy)

    soft_merge(model, locals_[:4], digits_task.gate.tensors(), SoftMergeConfig(steps=20, keep_mode="anchor"))

    start, ceiling, keep = seen[0]
    assert len(seen) == 1
    assert float(start[0, keep]) == merge_module.LOG_ALPHA_MIN
    assert float(ceiling[0, keep]) == merge_module.LOG_ALPHA_MIN


def test_a_unit_whose_client_gates_all_close_falls_back_to_the_keep_model(honest_candidates, digits_task, monkeypatch):
    model, locals_ = honest_candidates

    def close_all(model_, stacked, log_alpha, *args, **kwargs):
        with torch.no_grad():
            log_alpha.fill_(merge_module.LOG_ALPHA_MIN)
        return 5, 0
    monkeypatch.setattr(merge_module, "_learn_gates", close_all)

    merged, report = soft_merge(model, locals_[:3], digits_task.gate.tensors(), SoftMergeConfig(keep_mode="anchor"))

    assert report.weights == [[0.0, 0.0, 0.0, 1.0]]
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())


def test_a_harmful_merge_of_the_clients_alone_is_learned_again_with_the_keep_model_then_from_closed_gates(
        honest_candidates, digits_task, monkeypatch):
    model, _ = honest_candidates
    ruinous = [_noisy(model.state_dict(), 1.0, seed) for seed in range(3)]
    seen = []

    def record_and_hold(model_, stacked, log_alpha, inputs, targets, config, keep_index, ceiling=None):
        seen.append((log_alpha.detach().clone(), ceiling.clone()))
        return 0, 0
    monkeypatch.setattr(merge_module, "_learn_gates", record_and_hold)

    merged, report = soft_merge(model, ruinous, digits_task.gate.tensors(),
                                SoftMergeConfig(warm_start=False, keep_mode="anchor"))

    assert report.rejected_loss is not None and not report.harm_fallback
    assert report.attempts == 3
    (alone, _), (with_keep, keep_ceiling), (closed, _) = seen
    open_ = SoftMergeConfig().init_log_alpha
    # 1: the three noisy clients open, the keep model shut; their mean is ruinous.
    assert float(alone[0, 3]) == merge_module.LOG_ALPHA_MIN and all(float(v) == open_ for v in alone[0, :3])
    # 2: the keep model joins at its own start and ceiling; the mean of all four is still ruinous.
    assert torch.all(with_keep == open_) and float(keep_ceiling[0, 3]) == open_
    # 3: clients at the closed threshold, the keep model open: the keep model alone passes.
    assert float(closed[0, 3]) == open_ and all(float(v) <= merge_module.LOG_ALPHA_CLOSED for v in closed[0, :3])
    assert report.weights == [[0.0, 0.0, 0.0, 1.0]]
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())


def test_a_passing_merge_of_the_clients_alone_is_one_attempt(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    _, report = soft_merge(model, locals_[:4], digits_task.gate.tensors(),
                           SoftMergeConfig(steps=20, keep_mode="anchor"))
    assert report.attempts == 1 and report.rejected_loss is None


def test_when_every_attempt_harms_the_keep_model_is_returned(honest_candidates, digits_task, monkeypatch):
    model, _ = honest_candidates
    ruinous = [_noisy(model.state_dict(), 1.0, seed) for seed in range(3)]

    def open_everything(model_, stacked, log_alpha, *args, **kwargs):
        with torch.no_grad():
            log_alpha.fill_(5.0)
        return 7, 0
    monkeypatch.setattr(merge_module, "_learn_gates", open_everything)

    merged, report = soft_merge(model, ruinous, digits_task.gate.tensors(),
                                SoftMergeConfig(warm_start=False, keep_mode="anchor"))

    assert report.harm_fallback and report.attempts == 3 and report.steps == 21
    assert report.weights == [[0.0, 0.0, 0.0, 1.0]]
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())


def test_keep_mode_is_checked_by_name_in_the_dataclass_and_the_run_config():
    with pytest.raises(ValueError, match="keep_mode"):
        SoftMergeConfig(keep_mode="ballast")
    with pytest.raises(ConfigError, match="softmerge-keep-mode"):
        parse_run_config({"softmerge-keep-mode": "ballast"}, check_paths=False)
    settings = parse_run_config({"softmerge-keep-mode": "candidate"}, check_paths=False)
    assert merge_config_from(settings).keep_mode == "candidate"


def test_anchor_is_the_default_in_the_dataclass_and_the_run_config():
    assert SoftMergeConfig().keep_mode == "anchor"
    assert merge_config_from(parse_run_config({}, check_paths=False)).keep_mode == "anchor"
