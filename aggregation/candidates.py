"""Candidate validation applied before any gate is learned.

A candidate is a state dict (parameter and buffer name -> tensor) returned by a client.
Only candidates that match the architecture exactly (same names, shapes and dtypes) and
hold finite values can be merged; the rest are excluded with a reason that the caller
logs. Finite but extreme-valued candidates pass on purpose: switching those off is the
gates' job, and the tests hold the gates to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Exclusion:
    """A candidate that was left out before gating, and why."""

    index: int
    label: str
    reason: str


def running_statistics(model: torch.nn.Module) -> list[str]:
    """The state-dict names of ``model``'s floating buffers: running statistics, not parameters."""
    state = model.state_dict()
    # Every alias of a shared buffer: each is a state-dict name the rules must not treat as a parameter.
    return [name for name, buffer in model.named_buffers(remove_duplicate=False)
            if name in state and buffer.is_floating_point()]


def as_tensor_state(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Convert a mapping of numpy arrays or tensors to CPU tensors, without copying."""
    converted = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            converted[name] = value.detach().cpu()
        elif isinstance(value, np.ndarray):
            # ascontiguousarray returns at least one dimension; a 0-d tensor must stay 0-d.
            converted[name] = torch.from_numpy(np.ascontiguousarray(value).reshape(value.shape))
        else:
            raise TypeError(f"{name!r} is a {type(value).__name__}, not an array or tensor")
    return converted


def candidate_problem(reference: StateDict, candidate: Mapping[str, object]) -> str | None:
    """Return why ``candidate`` cannot be merged with ``reference``, or None if it can."""
    if not candidate:
        return "empty state"
    missing = [name for name in reference if name not in candidate]
    extra = [name for name in candidate if name not in reference]
    if missing:
        return f"missing tensors {missing[:3]}"
    if extra:
        return f"unexpected tensors {extra[:3]}"
    for name, expected in reference.items():
        value = candidate[name]
        if not isinstance(value, (torch.Tensor, np.ndarray)):
            return f"{name!r} is a {type(value).__name__}, not an array"
        shape = tuple(value.shape)
        if shape != tuple(expected.shape):
            return f"{name!r} has shape {shape}, expected {tuple(expected.shape)}"
        dtype = value.dtype if isinstance(value, torch.Tensor) else _torch_dtype(value.dtype)
        if dtype is None:
            return f"{name!r} has unsupported dtype {value.dtype}"
        if dtype != expected.dtype:
            return f"{name!r} has dtype {dtype}, expected {expected.dtype}"
        if dtype.is_floating_point:
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
            if not bool(torch.isfinite(tensor).all()):
                return f"{name!r} holds non-finite values"
    return None


def validate_candidates(
    reference: StateDict,
    candidates: Sequence[Mapping[str, object]],
    labels: Sequence[str] | None = None,
) -> tuple[list[int], list[Exclusion]]:
    """Split candidates into the indices that can be merged and the excluded ones."""
    labels = list(labels) if labels is not None else [str(i) for i in range(len(candidates))]
    valid, excluded = [], []
    for index, candidate in enumerate(candidates):
        problem = candidate_problem(reference, candidate)
        if problem is None:
            valid.append(index)
        else:
            excluded.append(Exclusion(index, labels[index], problem))
    return valid, excluded


def _torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except (TypeError, ValueError):  # ValueError: a byte order other than the machine's
        return None
