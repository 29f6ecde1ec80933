"""Soft merging of candidate models with hard-concrete gates.

Chen et al., "Soft Merging: A Flexible and Robust Soft Model Merging Approach for
Enhanced Neural Network Performance", arXiv:2309.12259 (2023); gates from Louizos,
Welling & Kingma (2018), see :mod:`softmerge.aggregation.gates`.

The candidates (local optima returned by clients, plus by default the current global
model, the *keep* candidate) are grouped into merge units U (per layer by default). Each
(unit u, candidate k) pair has one gate z_uk with parameter log_alpha_uk. The merged
parameters of unit u are

    theta_u = sum_k w_uk * theta_uk,

with mixing weights, by mode,

    weight (default):  w_uk = z_uk / sum_j z_uj          (convex: the scale stays right)
    select:            w_u  = one_hot(argmax_k z_uk)      (straight-through gradient)
    sum:               w_uk = z_uk                        (raw soft merge, an ablation)

and a unit whose gates are all 0 falls back to the keep candidate. Only log_alpha is
learned, by Adam on the server's clean gate split:

    min_{log_alpha}  mean CE(f(x; theta(z)), y)  +  lambda * mean_{u,k} P(z_uk != 0).

The candidates' weights are never changed, only gated. The merged model is built from
the deterministic gates.

Numerics. Non-finite or mismatched candidates are excluded before gating. Finite but
extreme candidates are gated like any other; three guards keep gate learning finite on
them: log_alpha is warm-started from each candidate's own validation loss (a candidate
whose loss is astronomical starts closed), a step whose loss is not finite is skipped
rather than applied, and the gradient on log_alpha is made finite and norm-clipped.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from .candidates import Exclusion, as_tensor_state, validate_candidates
from .gates import deterministic_gates, expected_l0, sample_gates

MODES = ("weight", "select", "sum")
UNIT_KINDS = ("model", "layer", "tensor")
LOG_ALPHA_MIN = -10.0
KEEP_LABEL = "keep"


@dataclass
class SoftMergeConfig:
    """Settings of one soft merge.

    Attributes:
        units: ``"model"``, ``"layer"`` (one gate per module: weight, bias and buffers
            share it), ``"tensor"``, or a list of fnmatch patterns, one unit each;
            tensors no pattern matches form one last unit.
        mode: ``"weight"``, ``"select"`` or ``"sum"`` (see the module docstring).
        steps: the most gate-learning steps; fewer when the gates converge.
        lr: Adam learning rate on log_alpha.
        l0_lambda: weight of the expected-L0 penalty.
        batch_size: gate-split examples per step.
        seed: seeds the gate noise and the batch order.
        include_keep: add the current global model as a candidate.
        warm_start: start log_alpha from each candidate's own validation loss.
        init_log_alpha: starting log_alpha of the best candidate.
        warm_start_temperature: nats of extra loss that cost one unit of log_alpha.
        max_grad_norm: clip on the gradient norm of log_alpha.
        tolerance: the gates have converged when no deterministic gate moved more than
            this over ``check_every`` steps.
        check_every: steps between convergence checks.
    """

    units: str | Sequence[str] = "layer"
    mode: str = "weight"
    steps: int = 100
    lr: float = 0.1
    l0_lambda: float = 0.01
    batch_size: int = 128
    seed: int = 0
    include_keep: bool = True
    warm_start: bool = True
    init_log_alpha: float = 2.0
    warm_start_temperature: float = 1.0
    max_grad_norm: float = 1.0
    tolerance: float = 1e-3
    check_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.units, str):
            if self.units not in UNIT_KINDS:
                raise ValueError(f"units must be one of {UNIT_KINDS} or a list of name patterns, got {self.units!r}")
        elif not self.units or not all(isinstance(p, str) and p for p in self.units):
            raise ValueError("units as a list must hold non-empty name patterns")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        _require(isinstance(self.steps, int) and self.steps >= 0, "steps must be an integer >= 0")
        _require(_finite(self.lr) and self.lr > 0, "lr must be a finite number > 0")
        _require(_finite(self.l0_lambda) and self.l0_lambda >= 0, "l0_lambda must be a finite number >= 0")
        _require(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an integer >= 1")
        _require(_finite(self.init_log_alpha), "init_log_alpha must be finite")
        _require(_finite(self.warm_start_temperature) and self.warm_start_temperature > 0,
                 "warm_start_temperature must be a finite number > 0")
        _require(_finite(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm must be a finite number > 0")
        _require(_finite(self.tolerance) and self.tolerance >= 0, "tolerance must be a finite number >= 0")
        _require(isinstance(self.check_every, int) and self.check_every >= 1, "check_every must be an integer >= 1")


@dataclass(frozen=True)
class MergeUnit:
    """Tensor names that share one gate per candidate."""

    name: str
    tensor_names: tuple[str, ...]


@dataclass
class GateReport:
    """What one soft merge decided, and what it cost.

    ``gates[u][k]`` is the deterministic gate and ``weights[u][k]`` the mixing weight of
    candidate ``candidates[k]`` in unit ``units[u]``. Losses and accuracies are on the
    gate split: ``*_before`` for the keep candidate (the current global model),
    ``*_after`` for the merged model. ``candidate_losses`` are each candidate's own.
    """

    units: list[str]
    candidates: list[str]
    gates: list[list[float]]
    weights: list[list[float]]
    log_alpha: list[list[float]]
    candidate_losses: list[float]
    loss_before: float
    accuracy_before: float
    loss_after: float
    accuracy_after: float
    excluded: list[Exclusion] = field(default_factory=list)
    fallback_units: list[str] = field(default_factory=list)
    steps: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0

    def weight_on(self, labels: Sequence[str]) -> float:
        """Mean over units of the mixing weight that fell on the given candidates."""
        chosen = [k for k, label in enumerate(self.candidates) if label in set(labels)]
        if not self.units:
            return 0.0
        return sum(sum(row[k] for k in chosen) for row in self.weights) / len(self.units)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, digits: int = 2) -> str:
        """Weights as a text table: one row per candidate, one column per unit."""
        label_width = max([len(c) for c in self.candidates] + [9])
        widths = [max(len(u), digits + 3) for u in self.units]
        header = "candidate".ljust(label_width) + "  " + "  ".join(u.rjust(w) for u, w in zip(self.units, widths))
        rows = [header]
        for k, label in enumerate(self.candidates):
            cells = "  ".join(f"{self.weights[u][k]:.{digits}f}".rjust(w) for u, w in enumerate(widths))
            rows.append(label.ljust(label_width) + "  " + cells)
        for exclusion in self.excluded:
            rows.append(exclusion.label.ljust(label_width) + "  excluded: " + exclusion.reason)
        return "\n".join(rows)


def build_merge_units(model: nn.Module, units: str | Sequence[str] = "layer") -> list[MergeUnit]:
    """Group the model's parameters and buffers into merge units.

    Buffers (BatchNorm statistics and the like) belong to the unit of their module, so
    they follow that module's weights.
    """
    names = list(model.state_dict().keys())
    if units == "model":
        return [MergeUnit("model", tuple(names))]
    if units == "tensor":
        return [MergeUnit(name, (name,)) for name in names]
    if units == "layer":
        grouped: dict[str, list[str]] = {}
        for name in names:
            module = name.rsplit(".", 1)[0] if "." in name else name
            grouped.setdefault(module, []).append(name)
        return [MergeUnit(module, tuple(members)) for module, members in grouped.items()]
    remaining = list(names)
    result = []
    for pattern in units:
        members = [n for n in remaining if fnmatch.fnmatchcase(n, pattern)]
        if members:
            result.append(MergeUnit(pattern, tuple(members)))
            remaining = [n for n in remaining if n not in members]
    if remaining:
        result.append(MergeUnit("rest", tuple(remaining)))
    return result


def mixing_weights(
    gates: torch.Tensor,
    mode: str,
    fallback_index: torch.Tensor,
    straight_through: bool = True,
) -> torch.Tensor:
    """Per-unit mixing weights (U, K) from gates (U, K).

    ``fallback_index`` (U,) names the candidate a unit takes when all its gates are 0.
    """
    total = gates.sum(dim=-1, keepdim=True)
    dead = total <= 0
    if mode == "sum":
        weights = gates
    else:
        normalised = gates / total.clamp_min(torch.finfo(gates.dtype).tiny)
        if mode == "weight":
            weights = normalised
        else:
            hard = nn.functional.one_hot(gates.argmax(dim=-1), gates.shape[-1]).to(gates.dtype)
            # hard + (soft - soft) is exactly hard in the forward pass, so a one-hot
            # selection reproduces its candidate bit for bit, while the gradient is soft's.
            weights = hard + (normalised - normalised.detach()) if straight_through else hard
    fallback = nn.functional.one_hot(fallback_index, gates.shape[-1]).to(gates.dtype)
    return torch.where(dead, fallback, weights)


class _StackedCandidates:
    """Candidates stacked once per round: contiguous (K, d) matrices per unit.

    Each unit has one matrix for its floating-point parameters and one for its
    floating-point buffers. Buffers (BatchNorm statistics) follow the unit's mixing
    weights but carry no gradient: batch norm cannot differentiate through them.
    """

    def __init__(self, reference: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]],
                 units: Sequence[MergeUnit], buffer_names: set[str]) -> None:
        self.reference = reference
        self.states = states
        float_dtypes = [t.dtype for t in reference.values() if t.dtype.is_floating_point]
        self.dtype = torch.float64 if float_dtypes and all(d == torch.float64 for d in float_dtypes) else torch.float32
        # Per unit: [(names, matrix, differentiable)] and the names that cannot be mixed.
        self.groups: list[list[tuple[list[str], torch.Tensor, bool]]] = []
        self.other_names: list[list[str]] = []
        for unit in units:
            floats = [n for n in unit.tensor_names if reference[n].dtype.is_floating_point]
            groups = []
            for names, differentiable in (([n for n in floats if n not in buffer_names], True),
                                          ([n for n in floats if n in buffer_names], False)):
                if names:
                    matrix = torch.stack([torch.cat([state[n].reshape(-1).to(self.dtype) for n in names])
                                          for state in states])
                    groups.append((names, matrix, differentiable))
            self.groups.append(groups)
            self.other_names.append([n for n in unit.tensor_names if n not in floats])

    def merge(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors for mixing weights (U, K); differentiable in ``weights``."""
        merged: dict[str, torch.Tensor] = {}
        for u, groups in enumerate(self.groups):
            for names, matrix, differentiable in groups:
                unit_weights = weights[u] if differentiable else weights[u].detach()
                flat = unit_weights.to(self.dtype) @ matrix
                offset = 0
                for name in names:
                    ref = self.reference[name]
                    merged[name] = flat[offset:offset + ref.numel()].view(ref.shape).to(ref.dtype)
                    offset += ref.numel()
            if self.other_names[u]:
                # Integer buffers (batch counters) cannot be mixed: take the top candidate's.
                top = int(weights[u].argmax())
                for name in self.other_names[u]:
                    merged[name] = self.states[top][name]
        return merged


def evaluate_state(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                   targets: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` with ``state`` swapped in.

    A non-finite loss is reported as +inf rather than NaN, so that callers can rank it.
    """
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(targets), batch_size):
            x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
            logits = functional_call(model, dict(state), (x,))
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == y).sum())
    count = max(len(targets), 1)
    loss = total_loss / count
    return (loss if math.isfinite(loss) else math.inf), correct / count


def warm_start_log_alpha(losses: Sequence[float], config: SoftMergeConfig) -> torch.Tensor:
    """Initial log_alpha per candidate from each candidate's own validation loss.

    The best candidate starts at ``init_log_alpha``; every nat of extra loss costs
    ``1 / warm_start_temperature``. Non-finite losses start at the closed floor.
    """
    finite = [loss for loss in losses if math.isfinite(loss)]
    best = min(finite) if finite else 0.0
    start = []
    for loss in losses:
        if not config.warm_start:
            start.append(config.init_log_alpha)
        elif not math.isfinite(loss):
            start.append(LOG_ALPHA_MIN)
        else:
            value = config.init_log_alpha - (loss - best) / config.warm_start_temperature
            start.append(max(LOG_ALPHA_MIN, min(config.init_log_alpha, value)))
    return torch.tensor(start, dtype=torch.float32)


def soft_merge(
    model: nn.Module,
    candidates: Sequence[Mapping[str, object]],
    validation: tuple[torch.Tensor, torch.Tensor],
    config: SoftMergeConfig | None = None,
    keep: Mapping[str, torch.Tensor] | None = None,
    labels: Sequence[str] | None = None,
    initial_log_alpha: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], GateReport]:
    """Merge candidate models by learning hard-concrete gates on a validation set.

    Args:
        model: the architecture. Its current state is the keep candidate unless ``keep``
            is given. It is only read: its weights are never modified.
        candidates: state dicts (name -> tensor or numpy array) of the client models.
        validation: ``(inputs, targets)`` of the gate split, a small clean labelled set.
        config: see :class:`SoftMergeConfig`.
        keep: the current global model, if not the model's own state.
        labels: a name per candidate, for the report.
        initial_log_alpha: optional (U, K) start for log_alpha, K counting the keep
            candidate last; it replaces the warm start (used to carry gates over rounds).

    Returns:
        The merged state dict (same names, shapes and dtypes as ``model.state_dict()``)
        and a :class:`GateReport`.
    """
    config = config or SoftMergeConfig()
    started = time.perf_counter()
    inputs, targets = validation
    reference = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    labels = list(labels) if labels is not None else [f"candidate-{i}" for i in range(len(candidates))]
    if len(labels) != len(candidates):
        raise ValueError(f"got {len(labels)} labels for {len(candidates)} candidates")

    valid_indices, excluded = validate_candidates(reference, candidates, labels)
    states = [as_tensor_state(candidates[i]) for i in valid_indices]
    gated_labels = [labels[i] for i in valid_indices]
    keep_state = as_tensor_state(keep) if keep is not None else reference
    if keep is not None and validate_candidates(reference, [keep])[1]:
        raise ValueError("the keep state does not match the model: " + validate_candidates(reference, [keep], ["keep"])[1][0].reason)
    if config.include_keep:
        states.append(keep_state)
        gated_labels.append(KEEP_LABEL)

    units = build_merge_units(model, config.units)
    unit_names = [unit.name for unit in units]
    was_training = model.training
    model.eval()
    try:
        loss_before, accuracy_before = evaluate_state(model, keep_state, inputs, targets)
        if not states:
            report = GateReport(unit_names, [], [[] for _ in units], [[] for _ in units], [[] for _ in units], [],
                                loss_before, accuracy_before, loss_before, accuracy_before, excluded,
                                fallback_units=unit_names, seconds=time.perf_counter() - started)
            return {name: tensor.clone() for name, tensor in keep_state.items()}, report

        buffer_names = {name for name, _ in model.named_buffers()}
        stacked = _StackedCandidates(reference, states, units, buffer_names)
        own = [evaluate_state(model, state, inputs, targets) for state in states]
        candidate_losses = [loss for loss, _ in own]
        if initial_log_alpha is not None and tuple(initial_log_alpha.shape) == (len(units), len(states)):
            start = torch.nan_to_num(initial_log_alpha.detach().float(), nan=LOG_ALPHA_MIN).clamp(LOG_ALPHA_MIN, -LOG_ALPHA_MIN)
        else:
            start = warm_start_log_alpha(candidate_losses, config).expand(len(units), -1)
        log_alpha = nn.Parameter(start.clone().contiguous())
        keep_index = len(states) - 1 if config.include_keep else None
        steps, skipped = _learn_gates(model, stacked, log_alpha, inputs, targets, config, keep_index)

        with torch.no_grad():
            gates = deterministic_gates(log_alpha)
            fallback = _fallback_index(log_alpha, keep_index)
            weights = mixing_weights(gates, config.mode, fallback, straight_through=False)
            if config.mode == "select":
                # Ties at a clamped gate of 1 go to the larger log_alpha.
                chosen = torch.where(gates.sum(-1) > 0, log_alpha.argmax(-1), fallback)
                weights = nn.functional.one_hot(chosen, len(states)).to(weights.dtype)
            merged = {name: tensor.detach().clone() for name, tensor in stacked.merge(weights).items()}
        loss_after, accuracy_after = evaluate_state(model, merged, inputs, targets)
    finally:
        model.train(was_training)

    dead_units = [unit_names[u] for u in range(len(units)) if float(gates[u].sum()) <= 0]
    report = GateReport(
        units=unit_names,
        candidates=gated_labels,
        gates=gates.tolist(),
        weights=weights.tolist(),
        log_alpha=log_alpha.detach().tolist(),
        candidate_losses=candidate_losses,
        loss_before=loss_before,
        accuracy_before=accuracy_before,
        loss_after=loss_after,
        accuracy_after=accuracy_after,
        excluded=excluded,
        fallback_units=dead_units,
        steps=steps,
        skipped_steps=skipped,
        seconds=time.perf_counter() - started,
    )
    return merged, report


def _learn_gates(model: nn.Module, stacked: _StackedCandidates, log_alpha: nn.Parameter, inputs: torch.Tensor,
                 targets: torch.Tensor, config: SoftMergeConfig, keep_index: int | None) -> tuple[int, int]:
    """Adam on log_alpha; returns (steps taken, steps skipped for a non-finite loss)."""
    if config.steps == 0 or log_alpha.shape[1] < 2 or len(targets) == 0:
        return 0, 0
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam([log_alpha], lr=config.lr)
    batch_size = min(config.batch_size, len(targets))
    previous = deterministic_gates(log_alpha.detach())
    skipped = 0
    for step in range(1, config.steps + 1):
        batch = torch.randperm(len(targets), generator=generator)[:batch_size]
        gates = sample_gates(log_alpha, generator)
        weights = mixing_weights(gates, config.mode, _fallback_index(log_alpha.detach(), keep_index))
        logits = functional_call(model, stacked.merge(weights), (inputs[batch],))
        loss = nn.functional.cross_entropy(logits, targets[batch]) + config.l0_lambda * expected_l0(log_alpha).mean()
        if not torch.isfinite(loss):
            skipped += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # An infinite partial still says which way to go; clipping then bounds the step.
        log_alpha.grad = torch.nan_to_num(log_alpha.grad, nan=0.0, posinf=1e6, neginf=-1e6)
        torch.nn.utils.clip_grad_norm_([log_alpha], config.max_grad_norm)
        optimizer.step()
        with torch.no_grad():
            log_alpha.clamp_(LOG_ALPHA_MIN, -LOG_ALPHA_MIN)
        if step % config.check_every == 0:
            current = deterministic_gates(log_alpha.detach())
            if float((current - previous).abs().max()) <= config.tolerance:
                return step, skipped
            previous = current
    return config.steps, skipped


def _fallback_index(log_alpha: torch.Tensor, keep_index: int | None) -> torch.Tensor:
    if keep_index is not None:
        return torch.full((log_alpha.shape[0],), keep_index, dtype=torch.long)
    return log_alpha.argmax(dim=-1)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
