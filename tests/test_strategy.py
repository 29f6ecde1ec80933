"""SoftMerge as a Flower strategy, fed hand-built reply messages."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from softmerge.aggregation import SoftMergeConfig
from softmerge.server.strategy import SoftMerge


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are stamped with the running task's identity, which a ServerApp process sets."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class StubGrid:
    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


def _reply(node_id, state=None, error=None, partition=None, extra_arrays=False):
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node_id, message_type="train")
    if error is not None:
        return Message(Error(code=1, reason=error), reply_to=instruction)
    records = {"arrays": ArrayRecord(state)}
    if extra_arrays:
        records["more"] = ArrayRecord(state)
    metrics = {"train-loss": 0.5, "num-examples": 100}
    if partition is not None:
        metrics["partition-id"] = partition
    records["metrics"] = MetricRecord(metrics)
    return Message(RecordDict(records), reply_to=instruction)


def _strategy(model, digits_task, reports):
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=30),
                         on_report=lambda r, report: reports.append((r, report)))
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid(list(range(1, 9)))))
    return strategy


def test_aggregate_train_merges_valid_replies_and_excludes_the_rest(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    reports = []
    strategy = _strategy(model, digits_task, reports)
    nan_state = {k: torch.full_like(v, math.nan) for k, v in locals_[5].items()}
    replies = [_reply(i + 1, locals_[i], partition=i) for i in range(5)]
    replies += [_reply(6, error="client crashed"), _reply(7, nan_state, partition=6),
                _reply(8, locals_[7], extra_arrays=True)]

    arrays, metrics = strategy.aggregate_train(1, replies)

    merged = arrays.to_torch_state_dict()
    assert set(merged) == set(model.state_dict())
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert metrics["softmerge-excluded"] == 3 and metrics["softmerge-candidates"] == 6
    assert "partition-id" not in metrics and metrics["train-loss"] == pytest.approx(0.5)
    (server_round, report), = reports
    assert server_round == 1 and strategy.reports[1] is report
    assert report.candidates == [f"client-{i}" for i in range(5)] + ["keep"]
    reasons = " ".join(e.reason for e in report.excluded)
    assert "client crashed" in reasons and "non-finite" in reasons and "one ArrayRecord" in reasons


def test_a_round_with_no_valid_reply_keeps_the_global_model(honest_candidates, digits_task):
    model, _ = honest_candidates
    strategy = _strategy(model, digits_task, [])
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, error="timeout"), _reply(2, error="oom")])
    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert metrics["softmerge-excluded"] == 2 and metrics["softmerge-keep-weight"] == 1.0


def test_wrongly_shaped_reply_is_excluded(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    strategy = _strategy(model, digits_task, [])
    wrong = dict(locals_[1])
    wrong["fc1.weight"] = torch.zeros(3, 3)
    wrong_dtype = {k: v.double() for k, v in locals_[2].items()}
    arrays, metrics = strategy.aggregate_train(
        2, [_reply(1, locals_[0], partition=0), _reply(2, wrong, partition=1), _reply(3, wrong_dtype, partition=2)])
    assert metrics["softmerge-excluded"] == 2
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
    assert isinstance(next(iter(arrays.values())), Array)
