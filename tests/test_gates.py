"""The hard-concrete gate against its closed forms (Louizos et al. 2018)."""

import math

import pytest
import torch

from softmerge.aggregation import BETA, GAMMA, ZETA, deterministic_gates, expected_l0, sample_gates


def test_constants_are_the_papers():
    assert (GAMMA, ZETA, BETA) == (-0.1, 1.1, 2.0 / 3.0)


@pytest.mark.parametrize("log_alpha", [-6.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 6.0])
def test_monte_carlo_nonzero_probability_matches_closed_form(log_alpha):
    generator = torch.Generator().manual_seed(1)
    samples = sample_gates(torch.full((200_000,), log_alpha), generator)
    empirical = float((samples != 0).float().mean())
    closed = float(expected_l0(torch.tensor(log_alpha)))
    assert abs(empirical - closed) < 0.02, (log_alpha, empirical, closed)


def test_samples_lie_in_unit_interval_with_mass_at_both_ends():
    samples = sample_gates(torch.zeros(100_000), torch.Generator().manual_seed(0))
    assert float(samples.min()) == 0.0 and float(samples.max()) == 1.0
    assert 0.05 < float((samples == 0).float().mean()) < 0.2
    assert 0.05 < float((samples == 1).float().mean()) < 0.2


def test_closed_form_expected_l0():
    log_alpha = torch.linspace(-8, 8, 33)
    expected = torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))
    torch.testing.assert_close(expected_l0(log_alpha), expected)


def test_deterministic_gate_matches_formula_without_temperature():
    log_alpha = torch.linspace(-8, 8, 65)
    manual = [min(1.0, max(0.0, (1 / (1 + math.exp(-a))) * (ZETA - GAMMA) + GAMMA)) for a in log_alpha.tolist()]
    torch.testing.assert_close(deterministic_gates(log_alpha), torch.tensor(manual))
    # Exactly closed below log(1/11), exactly open above log(11/1) - log(...) of the upper clamp.
    assert float(deterministic_gates(torch.tensor(-2.5))) == 0.0
    assert float(deterministic_gates(torch.tensor(2.5))) == 1.0


def test_sampling_is_differentiable_in_log_alpha():
    log_alpha = torch.zeros(1000, requires_grad=True)
    sample_gates(log_alpha, torch.Generator().manual_seed(0)).sum().backward()
    assert log_alpha.grad is not None and float(log_alpha.grad.abs().sum()) > 0
