"""Hard-concrete gates, the L0 surrogate of Louizos, Welling & Kingma (ICLR 2018).

"Learning Sparse Neural Networks through L0 Regularization", arXiv:1712.01312.

A gate with location parameter ``log_alpha`` and temperature ``beta`` is a binary
concrete variable stretched to ``(gamma, zeta)`` and clamped to ``[0, 1]``:

    u ~ U(eps, 1 - eps)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)

The clamp puts real probability mass on exactly 0 and exactly 1, so a learned gate can
switch a candidate off completely. The probability that a gate is non-zero has the
closed form

    P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)),

which is the differentiable expected-L0 penalty. At test time the gate is the
deterministic

    z_hat = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)   (no division by beta).
"""

from __future__ import annotations

import math

import torch

GAMMA = -0.1
ZETA = 1.1
BETA = 2.0 / 3.0
# Keeps log(u) and log(1 - u) finite in float32.
UNIFORM_EPS = 1e-6

# sigmoid(log_alpha) must exceed -gamma / (zeta - gamma) for the deterministic gate to be
# non-zero; below this log_alpha the gate is exactly 0.
LOG_ALPHA_CLOSED = math.log(-GAMMA / ZETA)


def sample_gates(
    log_alpha: torch.Tensor,
    generator: torch.Generator | None = None,
    beta: float = BETA,
) -> torch.Tensor:
    """Draw one training-time hard-concrete sample per entry of ``log_alpha``."""
    u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype)
    u = u.clamp(UNIFORM_EPS, 1.0 - UNIFORM_EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Closed-form probability that each gate is non-zero, P(z != 0)."""
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """Test-time gate: the stretched sigmoid of ``log_alpha``, clamped to [0, 1]."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
