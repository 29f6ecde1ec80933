"""Property-based: malformed and hostile replies never break a strategy or its broadcast.

Every generated round mixes honest replies with broken ones (errors, empty records,
missing or extra arrays, wrong shapes and dtypes, nan/inf/1e38, absurd or missing
``num-examples``, inconsistent metric keys or shapes). Whatever arrives, aggregate_train and
aggregate_evaluate must not raise, and the model they return must be finite and shaped
like the global model, or be the global model itself when nothing valid arrived.
"""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, Krum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from flower_helpers import StubGrid

from softmerge.aggregation import SoftMergeConfig
from softmerge.server.replies import harden
from softmerge.server.strategy import SoftMerge

REPLIES_PER_ROUND = 5
ROUNDS_PER_STRATEGY = 420  # 4 strategies x 420 rounds x 5 replies = 8,400 replies
GENERATED = {"replies": 0}


pytestmark = pytest.mark.usefixtures("task_identity")


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


GLOBAL = {k: v.detach().clone() for k, v in tiny_model().state_dict().items()}
GATE = (torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 2)

VALUES = st.sampled_from([math.nan, math.inf, -math.inf, 1e38, -1e38, 3e38, 0.0, 1e-45])
BROKEN_KINDS = ["error", "empty", "no-metrics", "missing-array", "extra-array", "shape", "dtype", "value",
                "num-examples", "metric-keys", "two-array-records", "renamed-record", "non-numeric-array",
                "nan-metric", "metric-shape", "truncated-npy", "garbled-npy-header"]


@st.composite
def replies(draw):
    kinds = draw(st.lists(st.sampled_from(["honest", "honest", *BROKEN_KINDS]), min_size=REPLIES_PER_ROUND,
                          max_size=REPLIES_PER_ROUND))
    built = []
    for node, kind in enumerate(kinds, start=1):
        instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
        if kind == "error":
            built.append(Message(Error(code=draw(st.integers(0, 10)), reason="client failed"), reply_to=instruction))
            continue
        noise = draw(st.floats(-0.1, 0.1))
        state = {k: (v + noise).numpy().copy() for k, v in GLOBAL.items()}
        metrics = {"train-loss": 0.3, "num-examples": draw(st.integers(1, 500)), "partition-id": node}
        name = draw(st.sampled_from(sorted(state)))
        if kind == "missing-array":
            del state[name]
        elif kind == "extra-array":
            state["intruder.weight"] = np.zeros(draw(st.integers(0, 3)), dtype=np.float32)
        elif kind == "shape":
            shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
            state[name] = np.zeros(shape if shape != state[name].shape else shape + (1,), dtype=np.float32)
        elif kind == "dtype":
            state[name] = state[name].astype(draw(st.sampled_from([np.float64, np.float16, np.int32, np.int64,
                                                                   np.bool_, np.complex64])))
        elif kind == "value":
            flat = state[name].reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = draw(VALUES)
        elif kind == "num-examples":
            metrics["num-examples"] = draw(st.sampled_from([0, -5, 10**12, math.nan, math.inf, 0.0, -1.0]))
        elif kind == "metric-keys":
            if draw(st.booleans()):
                metrics["surprise"] = 1.0
            else:
                del metrics["train-loss"]
        elif kind == "no-metrics":
            del metrics["num-examples"]
        elif kind == "nan-metric":
            metrics["train-loss"] = math.nan
        elif kind == "metric-shape":
            metrics["train-loss"] = draw(st.sampled_from([[0.3], [0.3, 0.3], []]))
        if kind == "non-numeric-array":
            arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
            arrays[name] = Array(dtype="object", shape=(1,), stype=Array(np.zeros(1)).stype, data=b"\x00garbage")
        elif kind in ("truncated-npy", "garbled-npy-header"):
            arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})
            good = arrays[name]
            cut = len(good.data) - draw(st.integers(1, 4)) if kind == "truncated-npy" else 10
            data = good.data[:cut] + (b"{'descr': ?" + b" " * 100 if kind == "garbled-npy-header" else b"")
            arrays[name] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=data)
        else:
            arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})
        records = {"arrays": arrays, "metrics": MetricRecord(metrics)}
        if kind == "empty":
            records = {}
        elif kind == "two-array-records":
            records["again"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})
        elif kind == "renamed-record":
            records = {"weights": arrays, "metrics": MetricRecord(metrics)}
        built.append(Message(RecordDict(records), reply_to=instruction))
    GENERATED["replies"] += len(built)
    return kinds, built


def _strategies():
    common = dict(fraction_evaluate=0.0)
    return {
        "softmerge": lambda: SoftMerge(tiny_model(), GATE, SoftMergeConfig(steps=3, check_every=1), **common),
        "fedavg": lambda: harden(FedAvg(**common)),
        "fedmedian": lambda: harden(FedMedian(**common)),
        "krum": lambda: harden(Krum(num_malicious_nodes=1, **common)),
    }


@pytest.mark.parametrize("name", list(_strategies()))
def test_hostile_replies_never_escape_or_poison_the_broadcast(name):
    build = _strategies()[name]

    @settings(max_examples=ROUNDS_PER_STRATEGY, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(replies())
    def check(generated):
        kinds, messages = generated
        strategy = build()
        list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(),
                                      StubGrid(range(1, REPLIES_PER_ROUND + 1))))
        arrays, metrics = strategy.aggregate_train(1, messages)
        assert arrays is not None
        state = arrays.to_torch_state_dict()
        assert set(state) == set(GLOBAL)
        for key, tensor in state.items():
            assert tensor.shape == GLOBAL[key].shape and tensor.dtype == GLOBAL[key].dtype
            assert torch.isfinite(tensor).all(), (kinds, key)
        # A reply whose metric keys or shapes differ from the others' is still a model.
        usable = ("honest", "metric-keys", "metric-shape", "value")
        if not any(kind in usable for kind in kinds):
            assert all(torch.equal(state[k], GLOBAL[k]) for k in GLOBAL), kinds
        excluded = metrics.get("softmerge-excluded", metrics.get("replies-excluded"))
        assert excluded >= sum(kind not in usable for kind in kinds), kinds
        # Evaluate replies are screened the same way.
        strategy.aggregate_evaluate(1, messages)

    before = GENERATED["replies"]
    check()
    # Hypothesis stops early on a search space it thinks exhausted: this many replies were really tried.
    assert GENERATED["replies"] - before >= 500


def _offset_reply(node: int, metrics: dict) -> Message:
    """Node ``node``'s train reply: the global model moved by 0.01 * node, with ``metrics`` and a count of 10."""
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    state = {k: (v + 0.01 * node).numpy().copy() for k, v in GLOBAL.items()}
    record = MetricRecord({**metrics, "num-examples": 10, "partition-id": node})
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}), "metrics": record}),
                   reply_to=instruction)


@pytest.mark.parametrize("name", list(_strategies()))
def test_one_list_valued_metric_is_left_out_of_the_average_but_its_model_counts(name):
    """Flower averages a metric element by element: a list where the others send a number
    made the whole aggregation raise, so one client kept every honest update out; then it
    cost that reply its model, which let a majority shut out the rest by their metrics."""
    strategy = _strategies()[name]()
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(range(1, 6))))
    messages = [_offset_reply(node, {"train-loss": [0.3, 0.3] if node == 5 else 0.3}) for node in range(1, 6)]
    arrays, metrics = strategy.aggregate_train(1, messages)
    assert metrics.get("softmerge-excluded", metrics.get("replies-excluded")) == 0
    assert metrics["replies-used"] == 5 and metrics["train-loss"] == pytest.approx(0.3)
    assert not all(torch.equal(arrays.to_torch_state_dict()[k], GLOBAL[k]) for k in GLOBAL)


def _update_rules():
    from softmerge.server.baselines import CenteredClipping, GeometricMedian

    return {"centered-clipping": lambda: CenteredClipping(fraction_evaluate=0.0),
            "geomed": lambda: GeometricMedian(fraction_evaluate=0.0)}


class _SkippingFedAvg(FedAvg):
    """A Flower rule that skips the round, as Bulyan does when it has too few replies."""

    def aggregate_train(self, server_round, replies):
        return None, None


class _RaisingFedAvg(FedAvg):
    def aggregate_train(self, server_round, replies):
        raise np.linalg.LinAlgError("singular")


def _raising_update_rules():
    def singular(*args):
        raise np.linalg.LinAlgError("singular")

    def raising(rule):
        strategy = rule()
        strategy._aggregate_updates = singular
        return strategy

    return {"skipping": lambda: harden(_SkippingFedAvg(fraction_evaluate=0.0)),
            "raising": lambda: harden(_RaisingFedAvg(fraction_evaluate=0.0)),
            **{f"raising-{name}": (lambda rule=rule: raising(rule)) for name, rule in _update_rules().items()}}


@pytest.mark.parametrize("name", list(_raising_update_rules()))
def test_replies_a_rule_did_not_aggregate_are_not_counted_as_used(name):
    # The run's "no usable reply, so failed" check reads replies-used: counted for a round
    # whose rule skipped or raised, a deployment that never trained ended "finished".
    strategy = _raising_update_rules()[name]()
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(range(1, 6))))
    arrays, metrics = strategy.aggregate_train(1, [_offset_reply(node, {"train-loss": 0.3}) for node in range(1, 6)])
    assert all(torch.equal(arrays.to_torch_state_dict()[k], GLOBAL[k]) for k in GLOBAL)
    assert metrics["replies-used"] == 0 and metrics["replies-excluded"] == 0


@pytest.mark.parametrize("name", list(_strategies()) + list(_update_rules()))
def test_a_majority_with_one_metric_key_more_does_not_shut_out_the_other_models(name, caplog):
    strategy = {**_strategies(), **_update_rules()}[name]()
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(range(1, 6))))
    messages = [_offset_reply(node, {"train-loss": 0.1 * node} | ({"extra": 1.0} if node >= 3 else {}))
                for node in range(1, 6)]
    with caplog.at_level("WARNING"):
        arrays, metrics = strategy.aggregate_train(1, messages)
    assert metrics.get("softmerge-excluded", metrics.get("replies-excluded")) == 0
    assert metrics["replies-used"] == 5
    # The round's metrics are those of the most common form: nodes 3-5.
    assert metrics["extra"] == pytest.approx(1.0) and metrics["train-loss"] == pytest.approx(0.4)
    assert "node-1" in caplog.text and "metrics not averaged" in caplog.text
    # Each reply's own record is as it was sent (a Flower rule saw them cut to the shared keys).
    assert set(messages[0].content["metrics"]) == {"train-loss", "num-examples", "partition-id"}
    assert set(messages[4].content["metrics"]) == {"train-loss", "num-examples", "partition-id", "extra"}
    if name in ("fedavg", "fedmedian"):
        # Over all five models the mean and the median are node 3's offset; over nodes 3-5 alone, node 4's.
        merged = arrays.to_torch_state_dict()
        assert all(torch.allclose(merged[k], GLOBAL[k] + 0.03, atol=1e-5) for k in GLOBAL), name


@pytest.mark.parametrize("name", list(_strategies()))
def test_a_node_that_stops_answering_is_named_not_the_superlink(name, caplog):
    """When a node dies mid-round, the SuperLink answers for it from its own node ID (1): the
    exclusion must name the node the instruction went to, or every failure reads 'node-1'."""
    from uuid import uuid4

    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_ins_message

    strategy = _strategies()[name]()
    sent = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(range(11, 16))))
    for instruction in sent:
        instruction.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grid does when it pushes
    replies = []
    for instruction in sent:
        node = instruction.metadata.dst_node_id
        if node == 15:
            replies.append(create_message_error_unavailable_ins_message(instruction.metadata.message_id, run_id=0))
            continue
        state = {k: (v + 0.01 * node).numpy().copy() for k, v in GLOBAL.items()}
        metrics = MetricRecord({"train-loss": 0.3, "num-examples": 10})
        replies.append(Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                                           "metrics": metrics}), reply_to=instruction))
    with caplog.at_level("WARNING"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics.get("softmerge-excluded", metrics.get("replies-excluded")) == 1
    assert "excluded node-15 (no answer; reply from the SuperLink)" in caplog.text
    assert "node-1:" not in caplog.text and "node-1 " not in caplog.text
    if name == "softmerge":
        assert [e.label for e in strategy.reports[1].excluded] == ["node-15 (no answer; reply from the SuperLink)"]


@pytest.mark.parametrize("name", list(_strategies()) + list(_update_rules()))
def test_a_node_that_never_replies_is_named_and_counted(name, caplog):
    """Within round-timeout no reply, not even the SuperLink's error: before, the round
    recorded nothing and the log named nobody."""
    from uuid import uuid4

    strategy = {**_strategies(), **_update_rules()}[name]()
    sent = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(range(11, 16))))
    for instruction in sent:
        instruction.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grid does when it pushes
    # Each node's own update (the global model resent unchanged would not be a used reply).
    replies = [_offset_reply(instruction.metadata.dst_node_id - 10, {"train-loss": 0.3}) for instruction in sent]
    for reply, instruction in zip(replies, sent):
        reply.metadata.__dict__["_reply_to_message_id"] = instruction.metadata.message_id
    silent = {12, 14}
    replies = [reply for reply, instruction in zip(replies, sent) if instruction.metadata.dst_node_id not in silent]
    with caplog.at_level("WARNING"):
        _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["replies-missing"] == 2 and metrics["replies-used"] == 3
    assert "round 1 train: no reply from node-12 within the round's timeout" in caplog.text
    assert "no reply from node-14" in caplog.text and "no reply from node-11" not in caplog.text


def test_the_oracles_dropped_replies_are_not_nodes_that_never_replied(caplog):
    # The oracle drops the malicious replies before the screen sees them; every node replied.
    from uuid import uuid4

    from softmerge.simulations.oracle import exclude_partitions

    strategy = exclude_partitions(harden(FedAvg(fraction_evaluate=0.0)), {3, 4})
    sent = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), StubGrid(range(1, 6))))
    replies = []
    for instruction in sent:
        instruction.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grid does when it pushes
        replies.append(_offset_reply(instruction.metadata.dst_node_id, {"train-loss": 0.3}))
        replies[-1].metadata.__dict__["_reply_to_message_id"] = instruction.metadata.message_id
    with caplog.at_level("WARNING"):
        _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["replies-used"] == 3 and metrics["replies-missing"] == 0
    assert "no reply from" not in caplog.text


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.array(2.5), np.zeros((0, 3), np.float32),
    np.arange(6, dtype=">f8").reshape(2, 3), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.array([True, False]), np.arange(4, dtype=np.int64), np.array(["ab"]), np.zeros(2, np.complex64),
])
def test_a_reply_array_decodes_as_flowers_np_load_does(value):
    from softmerge.server.replies import _array_values

    array = Array(value)
    decoded, flowers = _array_values(array), array.numpy()
    assert decoded.dtype == flowers.dtype and decoded.shape == flowers.shape
    assert np.array_equal(decoded, flowers) and decoded.flags.c_contiguous == flowers.flags.c_contiguous
    # A copy, as np.load returns: the merge may write into it, and must not into the message.
    assert decoded.flags.writeable and not np.shares_memory(decoded, np.frombuffer(array.data, np.uint8))


def _npy(header: bytes, payload: bytes) -> bytes:
    """A version-1.0 .npy file with the given header text."""
    return b"\x93NUMPY\x01\x00" + len(header + b"\n").to_bytes(2, "little") + header + b"\n" + payload


@pytest.mark.parametrize("data", [
    Array(np.ones(4, np.float32)).data[:-3],  # the values cut short
    _npy(b"{'descr': ?", bytes(16)),  # a header that is no literal
    Array(np.ones(4, np.float32)).data[:10],  # no header at all
    _npy(b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", bytes(8)),  # pickled objects
    # Negative dimensions: frombuffer's count -1 reads whatever is there, and reshape fills one in.
    _npy(b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", bytes(16)),
    _npy(b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, -2), }", bytes(16)),
])
def test_a_broken_reply_array_fails_as_flowers_np_load_fails(data):
    from softmerge.server.replies import _array_values

    array = Array(dtype="float32", shape=(4,), stype=Array(np.zeros(1)).stype, data=data)
    with pytest.raises(Exception) as flowers:
        array.numpy()
    with pytest.raises(type(flowers.value)):
        _array_values(array)
