"""Client-side poisoning attacks (see DESIGN.md section 4).

Each attack rewrites the state a malicious client sends, given the global model it
received and the model it trained honestly. An *update* is ``trained - global``. Only
parameters are attacked; integer buffers and running statistics (a BatchNorm's mean and
variance, named by ``statistics``) are sent as trained, as the colluding harness leaves
them: a sign-flipped or noised variance goes negative and the model's outputs NaN, which
any screen rejects, so attacking them would only make the attack easier to catch.

- sign-flip: send ``global - update``.
- gaussian: send ``global + N(0, std^2)``.
- scaling (model replacement): send ``global + gamma * update``, gamma about n.
- extreme: send ``global + factor * update``; a factor of inf or nan sets every value to it.

- layer-stealth (gate-aware, adaptive): honest in every layer but the last one (the
  output layer, named by ``target_prefix``), which is sent as ``global - scale * update``.
  It probes whether per-layer gates let the honest layers through while still closing
  the poisoned one.

Label flipping (l -> C - 1 - l) and the backdoor happen in training instead; see
:func:`flip_labels` and :func:`softmerge.simulations.tasks.poison_with_backdoor`. A
backdoor may be boosted by model replacement: ``scaling`` applied to the backdoored model.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np
import torch


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return (num_classes - 1 - labels).astype(labels.dtype)


def poison_state(
    attack: str,
    global_state: Mapping[str, torch.Tensor],
    trained_state: Mapping[str, torch.Tensor],
    *,
    scale: float = 1.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    target_prefix: str | None = None,
    statistics: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """The state a malicious client sends instead of ``trained_state``.

    ``statistics``: the names of running statistics (:func:`running_statistics` of the
    model), sent as trained.
    """
    if attack == "layer-stealth" and target_prefix is None:
        target_prefix = last_layer_prefix(trained_state, statistics)
    poisoned = {}
    for name, trained in trained_state.items():
        untouched = attack in ("none", "label-flip", "backdoor") or name in statistics or (
            attack == "layer-stealth" and not _in_module(name, target_prefix))
        if not trained.dtype.is_floating_point or untouched:
            poisoned[name] = trained.clone()
            continue
        base = global_state[name].to(trained.dtype)
        update = trained - base
        if attack == "sign-flip":
            poisoned[name] = base - update
        elif attack == "layer-stealth":
            poisoned[name] = base - scale * update
        elif attack == "gaussian":
            noise = torch.randn(trained.shape, generator=generator, dtype=torch.float64) * std
            poisoned[name] = base + noise.to(trained.dtype)
        elif attack in ("scaling", "extreme"):
            if math.isnan(scale) or math.isinf(scale):
                poisoned[name] = torch.full_like(trained, scale)
            else:
                poisoned[name] = base + update * scale
        else:
            raise ValueError(f"unknown client attack {attack!r}")
    return poisoned


def last_layer_prefix(state: Mapping[str, torch.Tensor], statistics: Collection[str] = ()) -> str:
    """Module prefix of the last floating-point tensor that is not a running statistic (``statistics``).

    That is the output layer ("" for the top-level module).
    """
    floating = [name for name, tensor in state.items() if tensor.dtype.is_floating_point and name not in statistics]
    return floating[-1].rpartition(".")[0] if floating else ""


def _in_module(name: str, prefix: str) -> bool:
    """Whether tensor ``name`` belongs to the module ``prefix`` ("" is the top level's own tensors)."""
    return name.startswith(prefix + ".") if prefix else "." not in name
