"""``SoftMergeConfig.warm_start_step``: scoring a candidate at the step it takes in an even merge."""

import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from softmerge.aggregation import SoftMergeConfig, soft_merge
from softmerge.aggregation import merge as merge_module
from softmerge.aggregation.merge import (CLIENTS_START, CLOSED_START, KEEP_START, OPEN_SHARE_SUFFIX, OWN_STEP_SUFFIX,
                                         merge_step_losses, mirror_state, per_example_losses, round_bend, update_bend,
                                         warm_start_log_alpha)
from softmerge.server.strategy import SoftMerge

from flower_helpers import StubGrid, make_reply

# One feature, +1 for class 0 and -1 for class 1; the keep model (all zeros) is at log 2.
INPUTS = torch.tensor([[1.0]] * 4 + [[-1.0]] * 4)
TARGETS = torch.tensor([0] * 4 + [1] * 4)
ONLY_THE_START = dict(steps=0, include_keep=False, harm_margin=0.0)


def _zero_model() -> torch.nn.Linear:
    model = torch.nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def _state(slope: float, bias: float = 0.0) -> dict[str, torch.Tensor]:
    """Class 0's logit moved by slope * x + bias against the keep model."""
    return {"weight": torch.tensor([[slope], [0.0]]), "bias": torch.tensor([bias, 0.0])}


def test_merge_step_losses_score_the_shared_step_and_its_mirror_in_the_candidates_units():
    model, keep = _zero_model(), _state(0.0)
    candidate = _state(4.0, 8.0)
    keep_losses = per_example_losses(model, keep, INPUTS, TARGETS)

    own, reflected = merge_step_losses(model, candidate, keep, keep_losses, INPUTS, TARGETS, share=10)

    step = _state(0.4, 0.8)
    expected_own = keep_losses + 10 * (per_example_losses(model, step, INPUTS, TARGETS) - keep_losses)
    expected_mirror = keep_losses + 10 * (per_example_losses(model, mirror_state(step, keep), INPUTS, TARGETS)
                                          - keep_losses)
    assert torch.allclose(own, expected_own) and torch.allclose(reflected, expected_mirror)
    # At a share of 1 the scores are the candidate's own.
    full, _ = merge_step_losses(model, candidate, keep, keep_losses, INPUTS, TARGETS, share=1)
    assert torch.allclose(full, per_example_losses(model, candidate, INPUTS, TARGETS))
    assert merge_step_losses(model, candidate, keep, keep_losses, INPUTS, TARGETS, share=10, mirror=False)[1] is None


def test_an_update_that_overshoots_alone_but_descends_in_the_merge_starts_most_open_at_the_merge_step():
    # The overshooting update learns the right slope and a bias far toward class 0: its full
    # step costs class 1 four nats, a tenth of it descends. Nine mild updates learn the slope only.
    model = _zero_model()
    overshooting = _state(4.0, 8.0)
    mild = [_state(0.10 + 0.01 * i) for i in range(9)]
    candidates = [overshooting] + mild

    _, alone = soft_merge(model, candidates, (INPUTS, TARGETS), SoftMergeConfig(**ONLY_THE_START))
    _, merged = soft_merge(model, candidates, (INPUTS, TARGETS),
                           SoftMergeConfig(**ONLY_THE_START, warm_start_step="merge"))

    at_own_step, at_merge_step = alone.log_alpha[0], merged.log_alpha[0]
    assert at_own_step[0] < min(at_own_step[1:]) - 1.0
    assert at_merge_step[0] == pytest.approx(SoftMergeConfig().init_log_alpha)
    assert at_merge_step[0] > max(at_merge_step[1:])
    # The starts are the own-loss warm start of the merge-step scores (the mirror test passes everyone here).
    keep_losses = per_example_losses(model, _state(0.0), INPUTS, TARGETS)
    scores = [float(merge_step_losses(model, c, _state(0.0), keep_losses, INPUTS, TARGETS, share=10)[0].mean())
              for c in candidates]
    assert at_merge_step == pytest.approx(warm_start_log_alpha(scores, SoftMergeConfig()).tolist(), abs=1e-5)


def test_a_single_client_is_scored_at_its_own_step_either_way():
    model = _zero_model()
    candidates = [_state(4.0, 8.0)]
    _, alone = soft_merge(model, candidates, (INPUTS, TARGETS), SoftMergeConfig(**ONLY_THE_START))
    _, merged = soft_merge(model, candidates, (INPUTS, TARGETS),
                           SoftMergeConfig(**ONLY_THE_START, warm_start_step="merge"))
    assert merged.log_alpha == alone.log_alpha
    assert not merged.merge_step and not alone.merge_step


def test_a_keep_model_with_a_non_finite_loss_falls_back_to_each_candidates_own_step():
    # A keep model whose logits overflow on some examples leaves no loss change to scale there.
    model = _zero_model()
    keep = _state(3e38, 3e38)
    assert not torch.isfinite(per_example_losses(model, keep, INPUTS, TARGETS)).all()
    candidates = [_state(4.0, 8.0), _state(0.1), _state(0.2)]
    _, alone = soft_merge(model, candidates, (INPUTS, TARGETS), SoftMergeConfig(**ONLY_THE_START), keep=keep)
    _, merged = soft_merge(model, candidates, (INPUTS, TARGETS),
                           SoftMergeConfig(**ONLY_THE_START, warm_start_step="merge"), keep=keep)
    assert merged.log_alpha == alone.log_alpha


def test_an_unknown_warm_start_step_is_refused():
    with pytest.raises(ValueError, match="warm_start_step must be one of"):
        SoftMergeConfig(warm_start_step="half")


def test_an_updates_bend_is_the_mean_rise_of_it_and_its_mirror_image():
    own, reflected = torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([5.0, 5.0], dtype=torch.float64)
    assert update_bend(own, reflected, keep_loss=1.0) == pytest.approx((2.0 + 5.0) / 2 - 1.0)
    assert update_bend(own, torch.tensor([float("inf"), 0.0], dtype=torch.float64), keep_loss=1.0) == float("inf")
    # An update and its sign flip are each other's mirror images: the same bend.
    model, keep = _zero_model(), _state(0.0)
    keep_loss = float(per_example_losses(model, keep, INPUTS, TARGETS).mean())
    update, flipped = _state(4.0, 8.0), mirror_state(_state(4.0, 8.0), keep)

    def bend_of(state):
        return update_bend(per_example_losses(model, state, INPUTS, TARGETS),
                           per_example_losses(model, mirror_state(state, keep), INPUTS, TARGETS), keep_loss)
    assert bend_of(update) == pytest.approx(bend_of(flipped))


def test_the_round_bend_is_a_quantile_over_clients_of_the_finite_bends():
    assert round_bend([1.0, 2.0, 3.0, 4.0, 5.0], [1] * 5, 0.75) == pytest.approx(4.0)
    # Identical replies are scored once but count once per sender.
    assert round_bend([1.0, 5.0], [1, 3], 0.5) == pytest.approx(5.0)
    assert round_bend([1.0, float("inf"), 3.0], [1, 1, 1], 1.0) == pytest.approx(3.0)
    assert round_bend([float("inf"), float("nan")], [1, 1], 0.75) is None
    assert round_bend([], [], 0.75) is None


def test_clients_with_small_updates_lower_the_round_bend_only_to_an_honest_quantile():
    honest = [2.6, 3.0, 3.4, 3.8, 4.2, 4.6, 5.0, 5.4, 5.8, 6.2, 6.6, 7.0]
    hiding = [0.0] * 8
    quantile = 0.75
    lowered = round_bend(honest + hiding, [1] * 20, quantile)
    # The honest bends' (q (n - 1) - m) / (n - m - 1) quantile, with n = 20 clients of which m = 8 hide.
    assert lowered == pytest.approx(round_bend(honest, [1] * 12, (quantile * 19 - 8) / 11))
    assert lowered >= SoftMergeConfig().warm_start_bend


def _overshooting_round():
    # One update that overshoots (bend 3.3 nats: its full step costs class 1 four nats, its
    # mirror image class 0 twelve) and nine mild ones (bends near 0).
    return _zero_model(), [_state(4.0, 8.0)] + [_state(0.10 + 0.01 * i) for i in range(9)]


def test_auto_scores_at_the_merge_step_when_the_round_bends_past_the_threshold():
    model, candidates = _overshooting_round()
    # The top quantile is the overshooting update's bend, past the default 2.5 nats.
    _, auto = soft_merge(model, candidates, (INPUTS, TARGETS),
                         SoftMergeConfig(**ONLY_THE_START, warm_start_step="auto", warm_start_bend_quantile=1.0))
    _, merged = soft_merge(model, candidates, (INPUTS, TARGETS),
                           SoftMergeConfig(**ONLY_THE_START, warm_start_step="merge"))
    assert auto.merge_step and merged.merge_step
    # Own losses log(1 + e^-12) (class 0) and log(1 + e^4) (class 1), the mirror image's log(1 + e^12) and
    # log(1 + e^-4), against log 2.
    own_and_mirror = [math.log1p(math.exp(logit)) for logit in (-12.0, 4.0, 12.0, -4.0)]
    assert auto.bend == pytest.approx(sum(own_and_mirror) / 4 - math.log(2), rel=1e-5)
    assert merged.bend is None
    assert auto.log_alpha == merged.log_alpha


def test_auto_scores_at_the_candidates_step_when_the_round_does_not_bend():
    model, candidates = _overshooting_round()
    # Three quarters of the clients send mild updates: the round's bend is theirs.
    _, auto = soft_merge(model, candidates, (INPUTS, TARGETS),
                         SoftMergeConfig(**ONLY_THE_START, warm_start_step="auto"))
    _, alone = soft_merge(model, candidates, (INPUTS, TARGETS), SoftMergeConfig(**ONLY_THE_START))
    assert not auto.merge_step and not alone.merge_step
    assert 0 <= auto.bend < 0.01
    assert auto.log_alpha == alone.log_alpha
    # With gate learning and the keep model too, the merges are the same, bit for bit.
    merged_auto, _ = soft_merge(model, candidates, (INPUTS, TARGETS), SoftMergeConfig(steps=20, warm_start_step="auto"))
    merged_alone, _ = soft_merge(model, candidates, (INPUTS, TARGETS), SoftMergeConfig(steps=20))
    assert all(torch.equal(merged_auto[name], merged_alone[name]) for name in merged_alone)


def test_bad_bend_settings_are_refused():
    with pytest.raises(ValueError, match="warm_start_bend must be"):
        SoftMergeConfig(warm_start_bend=-1.0)
    with pytest.raises(ValueError, match="warm_start_bend must be"):
        SoftMergeConfig(warm_start_bend=float("nan"))
    with pytest.raises(ValueError, match="warm_start_bend_quantile must be"):
        SoftMergeConfig(warm_start_bend_quantile=1.5)


def _one_strategy_round(model, candidates, validation, caplog, config):
    """Round 1 of the SoftMerge strategy on these replies, one per node: its arrays and metrics."""
    strategy = SoftMerge(model, validation, config)
    nodes = list(range(1, len(candidates) + 1))
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid(nodes)))
    replies = [make_reply(node, state, partition=node) for node, state in zip(nodes, candidates)]
    with caplog.at_level(logging.INFO, logger="flwr"):
        return strategy.aggregate_train(1, replies)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("quantile", "expected"), [(1.0, 1), (0.75, 0)])
def test_the_strategy_reports_the_step_each_round_scored_at(quantile, expected, caplog):
    model, candidates = _overshooting_round()
    arrays, metrics = _one_strategy_round(model, candidates, (INPUTS, TARGETS), caplog,
                                          SoftMergeConfig(steps=5, warm_start_step="auto",
                                                          warm_start_bend_quantile=quantile))

    assert arrays is not None and metrics["softmerge-merge-step"] == expected
    assert f"scored at the {'merge' if expected else 'candidate'} step" in caplog.text


# One feature; a fifth of each side is mislabelled, so the best slope is log 4 and a much
# larger one costs the mislabelled examples about the slope in nats each.
NOISY_INPUTS = torch.tensor([[1.0]] * 5 + [[-1.0]] * 5)
NOISY_TARGETS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])


def _scaled_round():
    # Two honest updates (slope 1) and eight that take a like update scaled by the ten
    # clients (the scaling attack): at keep + delta / 10 each reads as a full honest step
    # with ten times its gain, while their merge overshoots by about 1.3 nats.
    honest = [_state(1.0), _state(1.02)]
    scaled = [_state(10.0 * (1.0 + 0.01 * i)) for i in range(8)]
    return _zero_model(), honest + scaled


def test_a_merge_step_round_whose_starts_all_harm_is_learned_again_from_the_own_step(caplog):
    model, candidates = _scaled_round()
    # A sharp warm start (a tenth of a nat per unit) and no gate learning: the starts decide.
    config = dict(steps=0, warm_start_temperature=0.1)
    own_merge, own = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS), SoftMergeConfig(**config))
    merge, report = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS),
                               SoftMergeConfig(**config, warm_start_step="merge"))

    assert report.merge_step and report.own_step_retry
    # Both merge-step starts (the clients alone, the keep model with them) let the scaled
    # updates in and harmed by more than the margin; the first own-step start passed.
    assert report.rejected_over_margin and report.rejected_loss > report.loss_before + 1.0
    assert report.attempts == 3 and report.start == CLIENTS_START + OWN_STEP_SUFFIX
    assert not report.harm_fallback and report.loss_after < report.loss_before
    assert sum(report.weights[0][2:]) == 0.0
    # That start is the round's at the candidates' own step: the same merge, bit for bit.
    assert not own.merge_step and not own.own_step_retry and own.start == CLIENTS_START
    assert report.log_alpha == own.log_alpha
    assert all(torch.equal(merge[name], own_merge[name]) for name in own_merge)


@pytest.mark.parametrize(("settings", "first_own_start"), [
    (dict(include_keep=False), CLIENTS_START),  # one start, no closed one to come before
    (dict(keep_mode="candidate"), KEEP_START),  # the keep start, then the own step's
    (dict(warm_start_step="auto", warm_start_bend_quantile=1.0), CLIENTS_START),
])
def test_the_own_step_retry_holds_without_a_keep_candidate_in_either_keep_mode_and_under_auto(settings,
                                                                                              first_own_start):
    model, candidates = _scaled_round()
    config = {"steps": 0, "warm_start_temperature": 0.1, "warm_start_step": "merge", **settings}
    merge, report = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS), SoftMergeConfig(**config))
    own_merge, own = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS),
                                SoftMergeConfig(**{**config, "warm_start_step": "candidate"}))
    assert report.merge_step and report.own_step_retry and not report.harm_fallback
    assert report.start == first_own_start + OWN_STEP_SUFFIX and own.start == first_own_start
    assert all(torch.equal(merge[name], own_merge[name]) for name in own_merge)


def test_a_round_that_harms_at_both_steps_ends_on_the_keep_model_after_the_own_steps_closed_start():
    # Only scaled updates: every start at either step harms, and the closed start closes all.
    model, candidates = _scaled_round()
    _, report = soft_merge(model, candidates[2:], (NOISY_INPUTS, NOISY_TARGETS),
                           SoftMergeConfig(steps=0, warm_start_step="merge"))
    assert report.own_step_retry
    assert report.start == CLOSED_START + OWN_STEP_SUFFIX
    assert report.attempts == 5  # two merge-step starts, then the own step's three
    # The closed start's merge is the keep model (every gate shut), which stands.
    assert report.weights[0][-1] == 1.0 and report.loss_after == report.loss_before


def test_a_given_start_is_never_learned_again_from_the_own_step():
    model, candidates = _scaled_round()
    start = torch.full((1, len(candidates) + 1), 2.0)  # the keep model is the last column
    _, report = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS),
                           SoftMergeConfig(steps=0, warm_start_step="merge"), initial_log_alpha=start)
    assert not report.own_step_retry and not report.start.endswith(OWN_STEP_SUFFIX)


def test_a_merge_step_round_that_fails_only_the_label_frequency_bar_is_not_learned_again():
    # Two updates too small to leave chance: every start's merge is within the margin but
    # none beats the label frequencies, so the round tries its three merge-step starts and
    # then the update directions, never the own step.
    model = _zero_model()
    candidates = [_state(1e-9), _state(2e-9)]
    _, report = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS),
                           SoftMergeConfig(steps=0, warm_start_step="merge"))
    assert report.merge_step and not report.own_step_retry
    assert report.rejected_loss is not None and not report.rejected_over_margin
    assert report.attempts == 3 and not report.start.endswith(OWN_STEP_SUFFIX)


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_reports_and_warns_of_a_round_learned_again_from_the_own_step(caplog):
    model, candidates = _scaled_round()
    arrays, metrics = _one_strategy_round(model, candidates, (NOISY_INPUTS, NOISY_TARGETS), caplog,
                                          SoftMergeConfig(steps=0, warm_start_temperature=0.1,
                                                          warm_start_step="merge"))

    assert metrics["softmerge-merge-step"] == 1 and metrics["softmerge-own-step-retry"] == 1
    assert "learned again from each client's own step (start: the clients alone, scored at the own step)" in caplog.text
    merged = arrays.to_torch_state_dict()
    assert 0.9 < float(merged["weight"][0, 0]) < 1.1  # the honest slopes' mean, not the scaled ones'


def _noisy_round():
    # Two honest updates and eight that move only the bias, by +-6 and +-3 (noise, no signal):
    # a bias of b costs about b^2 / 8 nats at its full step, so at keep + delta / 10 the
    # smaller ones read as nearly harmless and open a little, the larger ones do not.
    noise = [_state(0.0, bias) for bias in (6.0, -6.0, 6.1, -6.1, 3.0, -3.0, 3.1, -3.1)]
    return _zero_model(), [_state(1.0), _state(1.02)] + noise


OPEN_SHARE_CONFIG = dict(steps=0, warm_start_temperature=0.1, warm_start_step="merge")


def test_a_round_that_opens_fewer_clients_is_scored_again_at_the_share_they_get():
    model, candidates = _noisy_round()
    _, first = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS), SoftMergeConfig(**OPEN_SHARE_CONFIG))
    merge, report = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS),
                               SoftMergeConfig(**OPEN_SHARE_CONFIG, merge_step_share="open"))

    # Scored at a tenth of their step, the +-3 updates open; six of the ten are open.
    assert first.open_share is None and first.start == CLIENTS_START
    assert all(weight > 0 for weight in first.weights[0][6:10]) and sum(first.weights[0][2:6]) == 0.0
    # Each open update moves that merge by a sixth of its step: scored again there, the noise closes.
    assert report.open_share == 6 and report.attempts == 2
    assert report.start == CLIENTS_START + OPEN_SHARE_SUFFIX
    assert sum(report.weights[0][2:]) == 0.0 and report.weights[0][0] > 0 and report.weights[0][1] > 0
    assert report.loss_after < first.loss_after
    # The second start is the own-loss warm start of the scores at keep + delta / 6.
    keep = _state(0.0)
    keep_losses = per_example_losses(model, keep, NOISY_INPUTS, NOISY_TARGETS)
    scores = [float(merge_step_losses(model, c, keep, keep_losses, NOISY_INPUTS, NOISY_TARGETS, share=6)[0].mean())
              for c in candidates]
    expected = warm_start_log_alpha(scores, SoftMergeConfig(warm_start_temperature=0.1)).tolist()
    assert report.log_alpha[0][:-1] == pytest.approx(expected, abs=1e-5)
    assert 0.9 < float(merge["weight"][0, 0]) < 1.1 and abs(float(merge["bias"][0])) < 1e-6


def test_a_round_that_opens_every_client_or_none_is_not_scored_again():
    model, candidates = _noisy_round()
    every = [_state(1.0 + 0.01 * i) for i in range(4)]
    _, all_open = soft_merge(model, every, (NOISY_INPUTS, NOISY_TARGETS),
                             SoftMergeConfig(**OPEN_SHARE_CONFIG, merge_step_share="open"))
    assert all_open.merge_step and all_open.open_share is None and all_open.attempts == 1
    # Scaled updates harm at the merge step and the round is learned again from the own step instead.
    _, scaled = soft_merge(model, _scaled_round()[1], (NOISY_INPUTS, NOISY_TARGETS),
                           SoftMergeConfig(**OPEN_SHARE_CONFIG, merge_step_share="open"))
    assert scaled.own_step_retry and scaled.open_share is None
    # At the candidates' own step there is nothing to score again.
    _, own = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS),
                        SoftMergeConfig(**{**OPEN_SHARE_CONFIG, "warm_start_step": "candidate",
                                           "merge_step_share": "open"}))
    assert not own.merge_step and own.open_share is None


def test_when_every_start_at_the_open_share_fails_the_check_the_first_merge_stands(monkeypatch):
    model, candidates = _noisy_round()
    first_merge, first = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS),
                                    SoftMergeConfig(**OPEN_SHARE_CONFIG))
    scored = merge_module.merge_step_losses

    def misread_at_the_open_share(model, candidate, keep, keep_losses, inputs, targets, share, mirror=True):
        # A scoring that ranks the +-6 noise best at the second share: its merge harms, and
        # the closed start's merge (the keep model) does not beat the label frequencies.
        own, reflected = scored(model, candidate, keep, keep_losses, inputs, targets, share, mirror)
        if share < 10:
            own = keep_losses - 5.0 if abs(float(candidate["bias"][0])) > 5 else own + 5.0
        return own, reflected

    monkeypatch.setattr(merge_module, "merge_step_losses", misread_at_the_open_share)
    merge, report = soft_merge(model, candidates, (NOISY_INPUTS, NOISY_TARGETS),
                               SoftMergeConfig(**OPEN_SHARE_CONFIG, merge_step_share="open"))
    assert report.open_share == 6 and report.attempts == 4  # the first merge, then three starts that fail
    assert report.start == CLIENTS_START and not report.harm_fallback
    assert report.log_alpha == first.log_alpha and report.loss_after == first.loss_after
    assert all(torch.equal(merge[name], first_merge[name]) for name in first_merge)


def test_an_unknown_merge_step_share_is_refused():
    with pytest.raises(ValueError, match="merge_step_share must be one of"):
        SoftMergeConfig(merge_step_share="half")


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_reports_a_round_scored_again_at_the_open_share(caplog):
    model, candidates = _noisy_round()
    arrays, metrics = _one_strategy_round(model, candidates, (NOISY_INPUTS, NOISY_TARGETS), caplog,
                                          SoftMergeConfig(**OPEN_SHARE_CONFIG, merge_step_share="open"))

    assert metrics["softmerge-open-share"] == 6 and metrics["softmerge-merge-step"] == 1
    assert "the merge opened 6 client groups; scored again at that share" in caplog.text
    assert abs(float(arrays.to_torch_state_dict()["bias"][0])) < 1e-6  # no noise in the merge
