"""Robust baselines Flower lacks, as Message-API strategies: FLTrust, centered clipping, geometric median.

Each is a thin subclass of Flower's ``FedAvg`` whose rule is its ``aggregate_train``
(``configure_train`` only remembers the model the round started from, which
``aggregate_train`` is not given, and ``aggregate_evaluate`` screens evaluation replies;
see :class:`~softmerge.server.replies.RoundStartMemory`). Per round:

1. replies that :func:`~softmerge.server.replies.screen_replies` rejects (an error,
   unreadable content, a missing or non-finite example count or metric, arrays that are
   non-finite or do not match the global model) are excluded with a logged reason, and so
   are updates (model - global) that overflow float64;
2. the rest become updates x_i = client model - global model (floating tensors only);
3. a rule of :mod:`softmerge.aggregation.robust` aggregates them;
4. the new global model is global + aggregate, with the global model's names, shapes
   and dtypes. Integer tensors (BatchNorm's batch counter) stay as they were. Running
   statistics named by ``statistics`` (BatchNorm's mean and variance; FLTrust finds
   them in its model, :func:`running_statistics` lists them for the others) are not
   passed to the rule: they become the coordinate-wise median of the clients' values,
   so a rescaling rule cannot make a variance negative.

A round with no usable reply, or whose aggregate would not be finite in the model's
dtypes, keeps the global model. Client input never raises.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log
from torch import nn

from ..aggregation.candidates import Exclusion, running_statistics
from ..aggregation.merge import checked_split
from ..aggregation.robust import (
    apply_update,
    centered_clipping,
    flatten_state,
    flatten_updates,
    floating_names,
    fltrust,
    fltrust_server_model,
    geometric_median,
    median_statistics,
    server_steps_per_epoch,
)
from .replies import (
    RoundStartMemory,
    aggregate_client_metrics,
    candidate_label,
    log_missing,
    log_unaveraged,
    screen_replies,
    sort_key,
)

# A client may report its partition id; it only names the client in logs and scores.
LABEL_KEY = "partition-id"
CC_REFERENCES = ("previous", "zero")


class _UpdateAggregation(RoundStartMemory):
    """Shared plumbing: replies -> validated update matrix -> rule -> new global ArrayRecord.

    Subclasses set ``metric_prefix`` and implement ``_aggregate_updates``. After each
    round, ``excluded[round]`` lists the replies left out and ``client_scores[round]``
    maps each used client's label to how much the rule listened to it (see the
    subclass).
    """

    metric_prefix = "robust"
    # Whether the rule reads the last applied update (a resumed run must then get it back).
    uses_applied_update = False

    def __init__(self, statistics: Iterable[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        # Floating tensors that are running statistics: the median of the clients', not the rule's.
        self.statistics = frozenset(statistics)
        self.excluded: dict[int, list[Exclusion]] = {}
        self.client_scores: dict[int, dict[str, float]] = {}
        # The update last added to the global model (float64, flattened); None before any.
        self.applied_update: torch.Tensor | None = None

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies' updates with the robust rule; keep the global model if none is valid."""
        name = type(self).__name__
        if self._global_state is None:
            log(WARNING, "%s round %d: no global model recorded by configure_train; skipping aggregation",
                name, server_round)
            return None, None
        global_state = self._global_state
        positions, states, labels, contents, excluded, averaged, missing = self._valid_replies(
            server_round, list(replies), global_state)
        names, updates = flatten_updates(global_state, states, self.update_names(global_state))
        # Finite float64 models can still differ by more than float64 holds.
        overflowing = [i for i in range(len(states)) if not bool(torch.isfinite(updates[i]).all())]
        if overflowing:
            excluded += [Exclusion(positions[i], labels[i], "update (model - global) overflows float64")
                         for i in overflowing]
            kept = [i for i in range(len(states)) if i not in overflowing]
            states, labels, contents = [states[i] for i in kept], [labels[i] for i in kept], [contents[i] for i in kept]
            averaged = [averaged[i] for i in kept]
            updates = updates[kept]
        self.excluded[server_round] = excluded
        for exclusion in excluded:
            log(WARNING, "%s round %d: excluded %s: %s", name, server_round, exclusion.label, exclusion.reason)

        metrics = self._aggregate_client_metrics([content for content, kept in zip(contents, averaged) if kept])
        metrics[f"{self.metric_prefix}-clients"] = len(states)
        metrics[f"{self.metric_prefix}-excluded"] = len(excluded)
        # As the hardened Flower strategies report them (see :func:`softmerge.server.replies.harden`).
        metrics["replies-excluded"] = len(excluded)
        metrics["replies-used"] = len(states)
        metrics["replies-missing"] = missing
        unchanged = ArrayRecord({key: tensor.clone() for key, tensor in global_state.items()})
        self.client_scores[server_round] = {}
        if not states:
            log(WARNING, "%s round %d: no valid reply; keeping the global model", name, server_round)
            return unchanged, metrics

        try:
            aggregate, scores, extra = self._aggregate_updates(server_round, updates, contents, global_state)
        except Exception as error:  # noqa: BLE001  (as the hardened Flower strategies: a failing rule must not end the run)
            log(ERROR, "%s round %d: the rule failed (%s: %s); keeping the global model", name, server_round,
                type(error).__name__, error, exc_info=True)
            return self._keep_global(unchanged, metrics, updates)
        self.client_scores[server_round] = dict(zip(labels, (float(s) for s in scores), strict=True))
        metrics.update(extra)
        new_state = apply_update(global_state, aggregate, names)
        new_state.update(median_statistics(global_state, states, [n for n in global_state if n in self.statistics]))
        if not all(bool(torch.isfinite(t).all()) for t in new_state.values() if t.dtype.is_floating_point):
            log(WARNING, "%s round %d: the aggregate overflows the model's dtypes; keeping the global model",
                name, server_round)
            return self._keep_global(unchanged, metrics, updates)
        self.applied_update = aggregate
        metrics[f"{self.metric_prefix}-update-norm"] = _finite_norm(aggregate)
        log(INFO, "%s round %d: %d clients aggregated, %d excluded; %s", name, server_round, len(states),
            len(excluded), ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
        return ArrayRecord(new_state), metrics

    def _keep_global(self, unchanged: ArrayRecord, metrics: MetricRecord,
                     updates: torch.Tensor) -> tuple[ArrayRecord, MetricRecord]:
        """The round keeps the global model: no update is applied and no reply went into it."""
        self.applied_update = torch.zeros(updates.shape[1], dtype=updates.dtype)
        metrics[f"{self.metric_prefix}-update-norm"] = 0.0
        metrics["replies-used"] = 0
        return unchanged, metrics

    def update_names(self, reference: dict[str, torch.Tensor]) -> list[str]:
        """The tensors the rule aggregates as updates: the floating ones that are not running statistics."""
        return [name for name in floating_names(reference) if name not in self.statistics]

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        """What a resumed run needs to go on as an uninterrupted one: the last applied update."""
        return {} if self.applied_update is None else {"applied_update": self.applied_update.numpy()}

    def restore_checkpoint_arrays(self, arrays: dict[str, np.ndarray], server_round: int = 0) -> None:
        """Take back :meth:`checkpoint_arrays`' output; anything malformed is logged and ignored.

        ``server_round`` is the checkpoint's: after round 1 a rule that starts from the last
        update (:attr:`uses_applied_update`) and finds none warns, since it starts from 0.
        """
        update = arrays.get("applied_update")
        if update is None:
            if server_round >= 1 and self.uses_applied_update:
                # Checkpoints written before the update was saved carry the same format version.
                log(WARNING, "%s: the checkpoint of round %d holds no applied update (an older checkpoint?); "
                    "the next round starts from 0 instead of the last update, unlike an uninterrupted run",
                    type(self).__name__, server_round)
            return
        if update.ndim != 1 or update.dtype != np.float64 or not np.isfinite(update).all():
            log(WARNING, "%s: the checkpoint's applied update is malformed (%s, %s); starting without it",
                type(self).__name__, update.dtype, update.shape)
            return
        self.applied_update = torch.from_numpy(update.copy())

    def _aggregate_updates(
        self,
        server_round: int,
        updates: torch.Tensor,
        contents: list[RecordDict],
        global_state: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, list[float], dict[str, float | int]]:
        """(aggregate update (d,), a score per client, extra scalar metrics)."""
        raise NotImplementedError

    def _reply_problem(self, content: RecordDict) -> str | None:
        """A rule-specific reason to exclude a reply, or None."""
        return None

    def _valid_replies(self, server_round: int, replies: list[Message], reference: dict[str, torch.Tensor]):
        screened = screen_replies(replies, reference, self.weighted_by_key, arrayrecord_key=self.arrayrecord_key,
                                  sent=self._sent_train)
        excluded = list(screened.rejected)
        log_missing(server_round, "train", screened.missing)
        log_unaveraged(server_round, "train", screened.unaveraged)
        # averaged[i]: whether contents[i]'s metrics go into the round's average (see screen_replies).
        positions, states, labels, contents, averaged = [], [], [], [], []
        # Replies arrive in completion order; a fixed order makes float sums reproducible.
        ordered = sorted(enumerate(zip(screened.messages, screened.states, screened.averaged)),
                         key=lambda item: sort_key(item[1][0]))
        for position, (message, state, metrics_averaged) in ordered:
            label = candidate_label(message, labels, LABEL_KEY)
            problem = self._reply_problem(message.content)
            if problem is not None:
                excluded.append(Exclusion(position, label, problem))
                continue
            positions.append(position)
            states.append(state)
            labels.append(label)
            contents.append(message.content)
            averaged.append(metrics_averaged)
        return positions, states, labels, contents, excluded, averaged, len(screened.missing)

    def _aggregate_client_metrics(self, contents: list[RecordDict]) -> MetricRecord:
        return aggregate_client_metrics(self, contents, (LABEL_KEY,))


# Bounds the server's training when clients report large example counts: FLTrust's g_0
# then takes at most this many passes over the root set.
MAX_SERVER_EPOCHS = 20


class FLTrust(_UpdateAggregation):
    """FLTrust (Cao et al., NDSS 2021): trust from the cosine to the server's own update.

    Each round the server trains a copy of the global model on its clean root set to
    get g_0, scores every client TS_i = ReLU(cos(g_i, g_0)), rescales each update to
    ||g_0|| and averages with weights TS_i (see :func:`softmerge.aggregation.robust.fltrust`).
    ``client_scores[round]`` holds the trust scores.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture; its weights are only a template and are never modified.
    root_data : tuple[torch.Tensor, torch.Tensor]
        The server's clean root set ``(inputs, labels)``: the same gate split SoftMerge gets.
    epochs, learning_rate, batch_size, momentum : training of the server model
        SGD on cross-entropy. The paper trains the server model the way clients train;
        pass the clients' settings to match it.
    match_client_steps : bool
        The paper's server runs the same number of local iterations R as a client. With
        this set the server takes, each round, as many SGD steps as the median reply's
        ``num-examples`` gives a client at ``epochs`` and ``batch_size`` (at most
        ``MAX_SERVER_EPOCHS`` passes over the root set), however small the root set is;
        the median, so a minority that misreports its example count cannot set it. Off
        (the default): ``epochs`` passes over the root set, fewer steps than a client
        whose data is larger, and so a shorter g_0 that every update is rescaled to. On
        the reference grid the shorter g_0 was the better FLTrust: in the three cells run
        with matched steps it lost 3–6 points in the final round and 1–2 in the mean of
        the last three (docs/benchmarks.md).
    seed : int
        The server training of round r is seeded with ``seed + r``.
    statistics : Iterable[str] (default: the model's floating buffers)
        Running statistics, merged as the clients' coordinate-wise median rather than
        rescaled with the updates (see the module docstring).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling, record keys).
    """

    metric_prefix = "fltrust"

    def __init__(
        self,
        model: nn.Module,
        root_data: tuple[torch.Tensor, torch.Tensor],
        epochs: int = 1,
        learning_rate: float = 0.1,
        batch_size: int = 16,
        momentum: float = 0.0,
        seed: int = 0,
        match_client_steps: bool = False,
        **kwargs,
    ) -> None:
        kwargs.setdefault("statistics", running_statistics(model))
        super().__init__(**kwargs)
        root_data = checked_split(model, root_data, "root")
        inputs, targets = root_data
        _require(isinstance(epochs, int) and epochs >= 1, f"epochs must be an integer >= 1, got {epochs!r}")
        _require(_finite_number(learning_rate) and learning_rate > 0,
                 f"learning_rate must be > 0, got {learning_rate!r}")
        _require(isinstance(batch_size, int) and batch_size >= 1,
                 f"batch_size must be an integer >= 1, got {batch_size!r}")
        _require(_finite_number(momentum) and 0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum!r}")
        self.model = model
        self.root_data = root_data
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.momentum = momentum
        self.seed = seed
        self.match_client_steps = match_client_steps

    def summary(self) -> None:
        log(INFO, "\t├──> FLTrust settings:")
        log(INFO, "\t│\t├── root set: %d examples", len(self.root_data[1]))
        log(INFO, "\t│\t└── server SGD: %s, lr %g, batch %d, momentum %g",
            f"the median client's steps at {self.epochs} epoch(s)" if self.match_client_steps
            else f"{self.epochs} epoch(s)", self.learning_rate, self.batch_size, self.momentum)
        super().summary()

    def server_steps(self, contents: list[RecordDict]) -> int | None:
        """SGD steps of the server model this round: the median client's (None: ``epochs`` passes)."""
        if not self.match_client_steps or not contents:
            return None
        median = statistics.median(float(next(iter(content.metric_records.values()))[self.weighted_by_key])
                                   for content in contents)
        per_epoch = math.ceil(median / self.batch_size)
        cap = MAX_SERVER_EPOCHS * server_steps_per_epoch(len(self.root_data[1]), self.batch_size)
        return max(1, min(self.epochs * per_epoch, cap))

    def _aggregate_updates(self, server_round, updates, contents, global_state):
        steps = self.server_steps(contents)
        trained, server_loss = fltrust_server_model(
            self.model, global_state, self.root_data, epochs=self.epochs, learning_rate=self.learning_rate,
            batch_size=self.batch_size, momentum=self.momentum, seed=self.seed + server_round, steps=steps)
        names = self.update_names(global_state)
        server_update = flatten_state(trained, names) - flatten_state(global_state, names)
        if not bool(torch.isfinite(server_update).all()):
            log(WARNING, "FLTrust round %d: the server update is not finite; keeping the global model", server_round)
            server_update = torch.zeros_like(server_update)
        aggregate, trust = fltrust(updates, server_update)
        extra = {
            "fltrust-trusted": int((trust > 0).sum()),
            "fltrust-mean-trust": float(trust.mean()),
            "fltrust-server-update-norm": _finite_norm(server_update),
            "fltrust-server-loss": server_loss if math.isfinite(server_loss) else -1.0,
            "fltrust-server-steps": steps if steps is not None
            else self.epochs * server_steps_per_epoch(len(self.root_data[1]), self.batch_size),
        }
        return aggregate, trust.tolist(), extra


class CenteredClipping(_UpdateAggregation):
    """Centered clipping (Karimireddy, He & Jaggi, ICML 2021) of client updates.

    v <- v + (1/K) sum_i (x_i - v) min(1, tau / ||x_i - v||), ``iterations`` times,
    from the previous round's aggregate update (``reference="previous"``, 0 in the
    first round), as the paper starts from its previous momentum, or from 0
    (``reference="zero"``). See :func:`softmerge.aggregation.robust.centered_clipping`.
    ``client_scores[round]`` holds each client's clip factor in the last iteration
    (1 = not clipped).

    Parameters
    ----------
    tau : float (default: 1.0)
        Clipping radius, an L2 norm in the units of a model update. Honest updates of
        the digits MLP after 3 local epochs have norms around 2 in the first round and
        shrink later; scale tau to your task.
    iterations : int (default: 1)
        L; the paper finds one iteration enough when the reference is good.
    reference : str (default: "previous")
        ``"previous"`` or ``"zero"``.
    statistics : Iterable[str] (default: none)
        Running statistics (:func:`running_statistics` of the model), merged as the
        clients' coordinate-wise median rather than clipped: carried over from the last
        round's update, a BatchNorm variance could otherwise go below 0.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    metric_prefix = "cclip"

    @property
    def uses_applied_update(self) -> bool:
        return self.reference == "previous"

    def __init__(self, tau: float = 1.0, iterations: int = 1, reference: str = "previous", **kwargs) -> None:
        super().__init__(**kwargs)
        _require(isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau > 0 and not math.isnan(tau),
                 f"tau must be a number > 0, got {tau!r}")
        _require(isinstance(iterations, int) and iterations >= 1,
                 f"iterations must be an integer >= 1, got {iterations!r}")
        _require(reference in CC_REFERENCES, f"reference must be one of {CC_REFERENCES}, got {reference!r}")
        self.tau = float(tau)
        self.iterations = iterations
        self.reference = reference

    def summary(self) -> None:
        log(INFO, "\t├──> Centered clipping settings:")
        log(INFO, "\t│\t└── tau %g | iterations %d | reference %s", self.tau, self.iterations, self.reference)
        super().summary()

    def _aggregate_updates(self, server_round, updates, contents, global_state):
        start = None
        if self.reference == "previous" and self.applied_update is not None \
                and self.applied_update.numel() == updates.shape[1]:
            start = self.applied_update
        aggregate, factors = centered_clipping(updates, start, tau=self.tau, iterations=self.iterations)
        extra = {
            "cclip-clipped": int((factors < 1).sum()),
            "cclip-tau": self.tau,
        }
        return aggregate, factors.tolist(), extra


class GeometricMedian(_UpdateAggregation):
    """Geometric median of client updates (RFA, Pillutla, Kakade & Harchaoui 2022).

    Smoothed Weiszfeld, weighted by each reply's ``weighted_by_key`` metric (the
    number of examples, as in the paper) or equally with ``weighted=False``. See
    :func:`softmerge.aggregation.robust.geometric_median`. ``client_scores[round]``
    holds each client's share of the final Weiszfeld weights.

    Parameters
    ----------
    nu : float (default: 1e-6)
        Smoothing: distances below nu count as nu.
    max_iter : int (default: 100)
        Most Weiszfeld iterations.
    ftol : float (default: 1e-6)
        Stop when a step moves the median by less than ftol times its norm.
    weighted : bool (default: True)
        Weight by the reported number of examples. Clients report that number
        themselves, so a malicious client can inflate it; ``False`` ignores it.
    statistics : Iterable[str] (default: none)
        Running statistics (:func:`running_statistics` of the model), merged as the
        clients' coordinate-wise median.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    metric_prefix = "geomed"

    def __init__(self, nu: float = 1e-6, max_iter: int = 100, ftol: float = 1e-6, weighted: bool = True,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        _require(_finite_number(nu) and nu > 0, f"nu must be a finite number > 0, got {nu!r}")
        _require(isinstance(max_iter, int) and max_iter >= 1, f"max_iter must be an integer >= 1, got {max_iter!r}")
        _require(_finite_number(ftol) and ftol >= 0, f"ftol must be a finite number >= 0, got {ftol!r}")
        self.nu = float(nu)
        self.max_iter = max_iter
        self.ftol = float(ftol)
        self.weighted = weighted

    def summary(self) -> None:
        log(INFO, "\t├──> Geometric median settings:")
        log(INFO, "\t│\t└── nu %g | max_iter %d | ftol %g | weighted by %s", self.nu, self.max_iter, self.ftol,
            f"'{self.weighted_by_key}'" if self.weighted else "nothing (equal weights)")
        super().summary()

    def _reply_problem(self, content: RecordDict) -> str | None:
        if self.weighted and _example_count(content, self.weighted_by_key) is None:
            return f"no positive finite '{self.weighted_by_key}' metric to weight by"
        return None

    def _aggregate_updates(self, server_round, updates, contents, global_state):
        weights = [_example_count(c, self.weighted_by_key) for c in contents] if self.weighted else None
        result = geometric_median(updates, weights, nu=self.nu, max_iter=self.max_iter, ftol=self.ftol)
        if not result.converged:
            log(WARNING, "GeometricMedian round %d: Weiszfeld did not converge in %d iterations", server_round,
                result.iterations)
        extra = {
            "geomed-iterations": result.iterations,
            "geomed-converged": int(result.converged),
        }
        return result.median, result.weights.tolist(), extra


def _example_count(content: RecordDict, key: str) -> float | None:
    for record in content.metric_records.values():
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
    return None


def _finite_norm(vector: torch.Tensor) -> float:
    """The L2 norm, computed so that a 1e30-scaled vector does not overflow the squares."""
    largest = float(vector.abs().max()) if vector.numel() else 0.0
    if largest == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(vector / largest)) * largest


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
