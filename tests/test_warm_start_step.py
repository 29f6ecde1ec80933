"""``SoftMergeConfig.warm_start_step``: scoring a candidate at the step it takes in an even merge."""

import pytest
import torch

from softmerge.aggregation import SoftMergeConfig, soft_merge
from softmerge.aggregation.merge import merge_step_losses, mirror_state, per_example_losses, warm_start_log_alpha

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
