"""Screening of client replies before any aggregation math.

A deployed server receives replies from clients it does not control. Flower's FedAvg
raises on inconsistent replies and ends the run; here every reply is checked on its own
and a bad one is excluded with a per-client reason, so the rest of the round proceeds:

- a reply that carries an error, or no content (an error the SuperLink sends for a node that
  stopped answering names the node the instruction went to, when the caller passes the
  round's sent messages);
- (train) not exactly one ArrayRecord, arrays that cannot be decoded, a missing or extra
  array, a wrong shape or dtype, a non-finite value;
- not exactly one MetricRecord, a missing, non-numeric, non-positive, non-finite or absurd
  ``num-examples``, or a non-finite metric.

A reply is never refused for its metric keys alone: if it were, the clients that send the
most common key set (a malicious majority, or the newer of two client versions) could shut
every other model out by adding a key. Flower averages metrics key by key and needs the
same keys and shapes in every reply, so the round's metrics are averaged over the replies
whose record name, keys and shapes are the most common (ties: the larger set, then the
first seen); the others still count as models, and their metrics are left out with a
logged note (``ScreenedReplies.unaveraged``).

:func:`harden` applies the screen to any Flower Message-API strategy, sorts the valid
replies into a reproducible order, and guards what the strategy returns: if it raises,
or returns no or non-finite arrays, the round keeps the previous global model.
"""

from __future__ import annotations

import functools
import io
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..aggregation import Exclusion, candidate_problem

# More examples than any client can plausibly hold: such a weight would let one reply
# dominate a weighted average.
MAX_NUM_EXAMPLES = 10**9


@dataclass
class ScreenedReplies:
    """Replies that passed the screen, their decoded states (train only), and the rest.

    ``averaged[i]`` says whether ``messages[i]``'s metrics are of the round's most common
    form, the ones its metric average is taken over; ``unaveraged`` notes why the others' are not.
    """

    messages: list[Message] = field(default_factory=list)
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    rejected: list[Exclusion] = field(default_factory=list)
    averaged: list[bool] = field(default_factory=list)
    unaveraged: list[Exclusion] = field(default_factory=list)
    # Nodes an instruction went to whose reply never came (within the round's timeout).
    missing: list[int] = field(default_factory=list)

    def averaged_messages(self) -> list[Message]:
        """The replies whose metrics the round averages."""
        return [message for message, kept in zip(self.messages, self.averaged) if kept]


def node_label(message: Message, sent_to: Mapping[str, int] | None = None) -> str:
    """``node-<id>`` of the reply's sender.

    When a node stops answering, the SuperLink itself replies in its place (Flower's
    "Node Unavailable" error, sent from the SuperLink's own node ID): with ``sent_to``
    (:func:`recipients` of the round's instructions) the label names the node the
    instruction went to, so a log of failures says which node failed.
    """
    try:
        source = message.metadata.src_node_id
        if source == SUPERLINK_NODE_ID and sent_to:
            instead = sent_to.get(message.metadata.reply_to_message_id)
            if instead is not None:
                return f"node-{instead} (no answer; reply from the SuperLink)"
        return f"node-{source}"
    except Exception:  # noqa: BLE001  (a reply without metadata still gets a label)
        return "node-?"


def recipients(sent: Iterable[Message]) -> dict[str, int]:
    """Message ID -> destination node of instructions the grid has pushed (it sets their IDs)."""
    found = {}
    for message in sent:
        try:
            if message.metadata.message_id:
                found[message.metadata.message_id] = message.metadata.dst_node_id
        except Exception:  # noqa: BLE001  (only labels depend on it)
            continue
    return found


def _metric_problem(metrics: MetricRecord, weighted_by_key: str) -> str | None:
    if weighted_by_key not in metrics:
        return f"metrics lack '{weighted_by_key}'"
    weight = metrics[weighted_by_key]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        return f"'{weighted_by_key}' is not a number: {weight!r}"
    if not math.isfinite(weight) or weight <= 0 or weight > MAX_NUM_EXAMPLES:
        return f"absurd '{weighted_by_key}': {weight!r}"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return f"metric '{key}' is not finite"
    return None


# What np.save writes first: the magic string, format version 1.0, the header's length.
NPY_V1_PREFIX = b"\x93NUMPY\x01\x00"


@functools.lru_cache(maxsize=256)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...]] | None:
    """dtype and shape of a version-1.0 ``.npy`` header of numbers in C order; else None.

    Cached by the header's bytes: every reply of a round repeats the global model's headers,
    and parsing one (a Python literal) costs more than copying a small layer's values.
    """
    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(header[len(NPY_V1_PREFIX):]))
    # numpy's header parser lets negative dimensions through; np.load then refuses them.
    if fortran_order or dtype.kind not in "biuf" or dtype.itemsize == 0 or any(size < 0 for size in shape):
        return None
    return dtype, shape


def _array_values(array: Array) -> np.ndarray:
    """``array.numpy()`` (Flower's ``np.load``, no pickles), its header parsed once per layout.

    Anything but a plain version-1.0 ``.npy`` of C-ordered numbers goes through Flower's
    own decoding, so an unusual or hostile reply gets exactly its errors.
    """
    data = array.data
    if array.stype == "numpy.ndarray" and isinstance(data, bytes) and data.startswith(NPY_V1_PREFIX):
        end = len(NPY_V1_PREFIX) + 2 + int.from_bytes(data[len(NPY_V1_PREFIX):len(NPY_V1_PREFIX) + 2], "little")
        try:
            layout = _npy_layout(data[:end])
        except Exception:  # noqa: BLE001  (np.load below raises what it raises for this header)
            layout = None
        if layout is not None:
            dtype, shape = layout
            count = math.prod(shape)
            if len(data) - end >= count * dtype.itemsize:
                # A copy, as np.load makes: the values must not alias the message's bytes.
                return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape).copy()
    return array.numpy()


def decode_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """``arrays`` as a state dict of tensors (what ``ArrayRecord.to_torch_state_dict`` gives), decoded
    faster; raises on an array that is not numeric or cannot be decoded."""
    state = {}
    for name, array in arrays.items():
        value = _array_values(array)
        if not isinstance(value, np.ndarray) or value.dtype == object:
            raise ValueError(f"array '{name}' is not numeric")
        # ascontiguousarray returns at least one dimension: reshape keeps a 0-d tensor (BatchNorm's
        # num_batches_tracked) 0-d, or every reply would fail the shape check.
        state[name] = torch.from_numpy(np.ascontiguousarray(value).reshape(value.shape))
    return state


def screen_replies(
    replies: Iterable[Message],
    reference: Mapping[str, torch.Tensor] | None,
    weighted_by_key: str = "num-examples",
    with_arrays: bool = True,
    arrayrecord_key: str = "arrays",
    sent: Iterable[Message] = (),
) -> ScreenedReplies:
    """Check every reply on its own; ``reference`` is the global model's state (train only).

    ``sent``, the round's instructions as pushed, lets an error reply from the SuperLink
    itself be labelled with the node it stands for (see :func:`node_label`).
    """
    screened = ScreenedReplies()
    candidates: list[tuple[Message, dict[str, torch.Tensor] | None, tuple]] = []
    sent_to = recipients(sent)
    answered = set()
    for position, message in enumerate(replies):
        label = node_label(message, sent_to)
        try:
            answered.add(message.metadata.reply_to_message_id)
        except Exception:  # noqa: BLE001  (a reply without metadata is screened out below)
            pass
        try:
            problem, state, signature = _check_one(message, reference, weighted_by_key, with_arrays,
                                                   arrayrecord_key)
        except Exception as error:  # noqa: BLE001  (whatever a reply holds, it cannot take the server down)
            problem, state, signature = f"unreadable reply: {type(error).__name__}: {error}", None, None
        if problem is not None:
            screened.rejected.append(Exclusion(position, label, problem))
        else:
            candidates.append((message, state, signature))

    # Flower averages metrics key by key, so the replies it averages must share one record
    # name and one key set, each key a number or a list of one length; the most common form
    # is averaged (ties: the larger set, then the first seen), and every reply stays a model.
    signatures = Counter(signature for _, _, signature in candidates)
    majority = max(signatures.items(), key=lambda item: (item[1], len(item[0][1])))[0] if signatures else None
    for position, (message, state, signature) in enumerate(candidates):
        if signature != majority:
            differing = sorted({key for key, _ in signature[1] ^ majority[1]}) or [f"record '{signature[0]}'"]
            screened.unaveraged.append(Exclusion(position, node_label(message),
                                                 f"metric keys or shapes differ from the round's: {differing[:4]}"))
        screened.messages.append(message)
        screened.averaged.append(signature == majority)
        if state is not None:
            screened.states.append(state)
    screened.missing = sorted(node for message_id, node in sent_to.items() if message_id not in answered)
    return screened


@contextmanager
def shared_metric_keys(messages: list[Message]) -> Iterator[None]:
    """Within the block, every reply's MetricRecord holds only the keys all of them hold in one shape.

    For a Flower strategy, which checks that every reply it aggregates holds the same metric
    keys and raises otherwise: the models of replies whose metrics differ still count. The
    record takes the most common name. Each reply's own record is put back on leaving, so
    nothing that reads the replies later sees them cut.
    """
    forms = []
    for message in messages:
        name, record = next(iter(message.content.metric_records.items()))
        forms.append((name, record, {(key, len(value) if isinstance(value, list) else None)
                                     for key, value in record.items()}))
    names = Counter(name for name, _, _ in forms)
    common_name = max(names, key=lambda name: names[name])
    shared = {key for key, _ in set.intersection(*(form for _, _, form in forms))} if forms else set()
    changed = [(message, name, record) for message, (name, record, form) in zip(messages, forms)
               if name != common_name or {key for key, _ in form} != shared]
    for message, name, record in changed:
        del message.content[name]
        message.content[common_name] = MetricRecord({key: record[key] for key in record if key in shared})
    try:
        yield
    finally:
        for message, name, record in changed:
            del message.content[common_name]
            message.content[name] = record


def _check_one(message: Message, reference, weighted_by_key: str, with_arrays: bool, arrayrecord_key: str):
    if message.has_error():
        return f"error reply: {message.error.reason}", None, None
    if not message.has_content() or not message.content:
        return "empty reply", None, None
    content = message.content
    metric_records = list(content.metric_records.items())
    if len(metric_records) != 1:
        return f"expected one MetricRecord, got {len(metric_records)}", None, None
    metrics_name, metrics = metric_records[0]
    problem = _metric_problem(metrics, weighted_by_key)
    if problem is not None:
        return problem, None, None
    # A list-valued metric is averaged element by element, so its length is part of what
    # every kept reply must share: one client's list where the others send a number would
    # make the strategy's metric averaging raise, and the round lose every update.
    signature = (metrics_name, frozenset((key, len(value) if isinstance(value, list) else None)
                                         for key, value in metrics.items()))
    if not with_arrays:
        return None, None, signature
    array_records = list(content.array_records.items())
    if len(array_records) != 1:
        return f"expected one ArrayRecord, got {len(array_records)}", None, None
    if array_records[0][0] != arrayrecord_key:
        return f"ArrayRecord is named '{array_records[0][0]}', expected '{arrayrecord_key}'", None, None
    state = decode_state(array_records[0][1])
    if reference is not None:
        problem = candidate_problem(reference, state)
        if problem is not None:
            return problem, None, None
    return None, state, signature


def candidate_label(message: Message, taken: list[str], label_key: str = "partition-id") -> str:
    """A name for a reply in reports: ``client-<id>`` if it reports one, else its node.

    The reported id is only a label, never trusted for anything else; a duplicate gets
    its node appended so that labels stay unique.
    """
    node = node_label(message)
    label = node
    for record in message.content.metric_records.values():
        value = record.get(label_key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            label = f"client-{int(value)}"
    return label if label not in taken else f"{label}@{node}"


def aggregate_client_metrics(strategy: FedAvg, contents: list,
                             drop: tuple[str, ...] = ("partition-id",)) -> MetricRecord:
    """The clients' train metrics averaged the way ``strategy`` averages them; empty on failure."""
    try:
        metrics = strategy.train_metrics_aggr_fn(contents, strategy.weighted_by_key) if contents else MetricRecord()
    except Exception as error:  # noqa: BLE001  (client metrics are informational only)
        log(WARNING, "%s: client train metrics not aggregated: %s", type(strategy).__name__, error)
        metrics = MetricRecord()
    for key in drop:
        if key in metrics:
            del metrics[key]
    return metrics


def sort_key(message: Message) -> tuple:
    """Reproducible order for replies that arrive in completion order."""
    for record in message.content.metric_records.values():
        value = record.get("partition-id")
        if isinstance(value, int) and not isinstance(value, bool):
            return (0, value, node_label(message))
    return (1, 0, node_label(message))


def conformed(arrays: ArrayRecord, reference: Mapping[str, torch.Tensor], server_round: int,
              rule: str) -> ArrayRecord | None:
    """``arrays`` in the global model's names, shapes and dtypes; None (logged) if they do not fit.

    Flower's averaging rules return float64 for an integer buffer (BatchNorm's batch count):
    broadcast as is, every honest reply of the next round would fail the dtype screen. A
    count is rounded back to its integer type; a missing, extra or reshaped array means the
    rule built some other model, and the global model is kept.
    """
    if set(arrays) != set(reference):
        log(WARNING, "round %d: %s returned arrays %s, not the model's; keeping the global model",
            server_round, rule, sorted(set(arrays) ^ set(reference))[:3])
        return None
    decoded, state = decode_state(arrays), {}
    for name, expected in reference.items():
        value = decoded[name]
        if tuple(value.shape) != tuple(expected.shape):
            log(WARNING, "round %d: %s returned %r with shape %s, expected %s; keeping the global model",
                server_round, rule, name, tuple(value.shape), tuple(expected.shape))
            return None
        if value.dtype != expected.dtype:
            value = (value.round() if not expected.dtype.is_floating_point and value.dtype.is_floating_point
                     else value).to(expected.dtype)
        state[name] = value
    return ArrayRecord(state)


def all_finite(arrays: ArrayRecord) -> bool:
    values = (_array_values(array) for array in arrays.values())
    return all(np.isfinite(value).all() for value in values if np.issubdtype(value.dtype, np.floating))


class RoundStartMemory(FedAvg):
    """A FedAvg that remembers, in ``configure_train``, the model the round started from.

    ``aggregate_train`` is not given that model, yet updates, the keep candidate and the
    fall-back when nothing valid arrives are all relative to it.
    """

    _global_state: dict[str, torch.Tensor] | None = None
    # The round's instructions: the grid sets their message IDs when it pushes them, which
    # lets a reply the SuperLink sends for a silent node be labelled with that node.
    _sent_train: list[Message] = []
    _sent_evaluate: list[Message] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
        self._global_state = decode_state(arrays)
        self._sent_train = list(super().configure_train(server_round, arrays, config, grid))
        return self._sent_train

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config, grid):
        self._sent_evaluate = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self._sent_evaluate

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's metric averaging over the replies that pass the screen; never raises."""
        return screened_evaluate(server_round, replies, self.weighted_by_key, super().aggregate_evaluate,
                                 sent=self._sent_evaluate)


def screened_evaluate(server_round: int, replies: Iterable[Message], weighted_by_key: str,
                      aggregate: Callable[[int, list[Message]], MetricRecord | None],
                      sent: Iterable[Message] = ()) -> MetricRecord | None:
    """``aggregate`` (a strategy's evaluate-metric averaging) over the screened replies, or None.

    An extra metric key, a list where the others send a number, a zero count or a nan would
    otherwise raise out of ``Strategy.start`` and end the run over numbers that are only reported.
    """
    screened = screen_replies(replies, None, weighted_by_key, with_arrays=False, sent=sent)
    log_rejections(server_round, "evaluate", screened.rejected)
    log_missing(server_round, "evaluate", screened.missing)
    log_unaveraged(server_round, "evaluate", screened.unaveraged)
    averaged = screened.averaged_messages()
    if not averaged:
        return None
    try:
        return aggregate(server_round, sorted(averaged, key=sort_key))
    except Exception as error:  # noqa: BLE001  (client metrics are informational only)
        log(WARNING, "round %d: evaluate metrics not aggregated: %s", server_round, error)
        return None


def harden(strategy: FedAvg) -> FedAvg:
    """Screen replies for ``strategy`` and guard its output, in place.

    ``Strategy.start`` calls the aggregation methods through the instance, so wrapping
    the bound methods hardens the instance without changing Flower's classes.
    """
    configure_train = strategy.configure_train
    configure_evaluate = strategy.configure_evaluate
    aggregate_train = strategy.aggregate_train
    aggregate_evaluate = strategy.aggregate_evaluate
    current: dict[str, ArrayRecord] = {}
    sent: dict[str, list[Message]] = {"train": [], "evaluate": []}

    def remember_global(server_round, arrays, config, grid):
        current["arrays"] = arrays
        sent["train"] = list(configure_train(server_round, arrays, config, grid))
        return sent["train"]

    def remember_evaluate(server_round, arrays, config, grid):
        sent["evaluate"] = list(configure_evaluate(server_round, arrays, config, grid))
        return sent["evaluate"]

    def screened_aggregate_train(server_round, replies):
        global_arrays = current.get("arrays")
        reference = decode_state(global_arrays) if global_arrays is not None else None
        screened = screen_replies(replies, reference, strategy.weighted_by_key,
                                  arrayrecord_key=strategy.arrayrecord_key, sent=sent["train"])
        log_rejections(server_round, "train", screened.rejected)
        log_missing(server_round, "train", screened.missing)
        log_unaveraged(server_round, "train", screened.unaveraged)
        valid = sorted(screened.messages, key=sort_key)
        arrays, metrics, round_metrics = None, None, None
        if screened.unaveraged:
            # The metrics of the most common form: the strategy gets every reply's record cut
            # to the keys they all share, so that it can aggregate every model.
            round_metrics = aggregate_client_metrics(strategy, [m.content for m in screened.averaged_messages()], ())
        if valid:
            try:
                with shared_metric_keys(valid) if screened.unaveraged else nullcontext():
                    arrays, metrics = aggregate_train(server_round, valid)
            except Exception as error:  # noqa: BLE001  (an aggregation rule failing must not end the run)
                log(WARNING, "round %d: %s failed on screened replies (%s); keeping the global model",
                    server_round, type(strategy).__name__, error)
                arrays, metrics = None, None
        if round_metrics is not None:
            metrics = round_metrics
        if arrays is not None and not all_finite(arrays):
            log(WARNING, "round %d: %s produced non-finite arrays; keeping the global model",
                server_round, type(strategy).__name__)
            arrays = None
        if arrays is not None and reference is not None:
            arrays = conformed(arrays, reference, server_round, type(strategy).__name__)
        # A rule that skipped the round (Bulyan short of replies), raised, or built an unusable
        # model used none of the replies: the global model goes out again.
        aggregated = arrays is not None
        if arrays is None:
            if not valid:
                log(WARNING, "round %d: no valid reply; keeping the global model", server_round)
            arrays = global_arrays
        metrics = metrics if metrics is not None else MetricRecord()
        if "partition-id" in metrics:
            del metrics["partition-id"]  # a label, meaningless as an average
        metrics["replies-excluded"] = len(screened.rejected)
        metrics["replies-used"] = len(valid) if aggregated else 0
        metrics["replies-missing"] = len(screened.missing)
        return arrays, metrics

    def screened_aggregate_evaluate(server_round, replies):
        return screened_evaluate(server_round, replies, strategy.weighted_by_key, aggregate_evaluate,
                                 sent=sent["evaluate"])

    strategy.configure_train = remember_global
    strategy.configure_evaluate = remember_evaluate
    strategy.aggregate_train = screened_aggregate_train
    strategy.aggregate_evaluate = screened_aggregate_evaluate
    return strategy


def log_rejections(server_round: int, phase: str, rejected: list[Exclusion]) -> None:
    for exclusion in rejected:
        log(WARNING, "round %d %s: excluded %s: %s", server_round, phase, exclusion.label, exclusion.reason)


def log_missing(server_round: int, phase: str, nodes: list[int]) -> None:
    for node in nodes:
        log(WARNING, "round %d %s: no reply from node-%d within the round's timeout", server_round, phase, node)


def log_unaveraged(server_round: int, phase: str, unaveraged: list[Exclusion]) -> None:
    for note in unaveraged:
        log(WARNING, "round %d %s: %s kept, its metrics not averaged: %s", server_round, phase, note.label,
            note.reason)
