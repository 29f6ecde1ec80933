"""Models with BatchNorm through every strategy: a 0-d integer buffer and float statistics.

BatchNorm's ``num_batches_tracked`` is a 0-d int64 tensor. Decoding a reply must keep it
0-d, and a rule that averages it (Flower's FedAvg gives float64) must not broadcast it as a
float, or every honest reply of the next round fails the screen and the model never trains.
"""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from torch import nn

from flower_helpers import StubGrid

from softmerge.aggregation import SoftMergeConfig, soft_merge
from softmerge.server.baselines import FLTrust, CenteredClipping, GeometricMedian
from softmerge.server.replies import harden
from softmerge.server.strategy import SoftMerge

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = [1, 2, 3, 4, 5]


def batchnorm_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


GATE = (torch.randn(32, 3, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 2)


def _strategies():
    common = dict(fraction_evaluate=0.0)
    return {
        "softmerge": lambda: SoftMerge(batchnorm_model(), GATE, SoftMergeConfig(steps=4, check_every=2), **common),
        "fltrust": lambda: FLTrust(batchnorm_model(), GATE, epochs=1, learning_rate=0.1, batch_size=8, **common),
        "centered-clipping": lambda: CenteredClipping(**common),
        "geomed": lambda: GeometricMedian(**common),
        "fedavg": lambda: harden(FedAvg(**common)),
        "fedmedian": lambda: harden(FedMedian(**common)),
        "fedtrimmedavg": lambda: harden(FedTrimmedAvg(beta=0.2, **common)),
    }


def _train_reply(instruction: Message, seed: int, scale: float = 1.0, learning_rate: float = 0.1) -> Message:
    """What a client sends: a locally trained copy's whole state dict, buffers included.

    ``scale`` sets the spread of its inputs: a small one moves running_var from 1 towards 0.
    """
    model = batchnorm_model()
    model.load_state_dict(instruction.content["arrays"].to_torch_state_dict())
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = scale * torch.randn(16, 3, generator=generator), torch.arange(16) % 2
    optimiser = torch.optim.SGD(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(2):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimiser.step()
    metrics = MetricRecord({"num-examples": 16, "train-loss": 0.1, "partition-id": seed % 100})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=instruction)


@pytest.mark.parametrize("name", list(_strategies()))
def test_a_batchnorm_model_trains_round_after_round(name):
    strategy = _strategies()[name]()
    start = batchnorm_model().state_dict()
    arrays = ArrayRecord(start)
    for server_round in (1, 2, 3):
        instructions = list(strategy.configure_train(server_round, arrays, ConfigRecord(), StubGrid(NODES)))
        replies = [_train_reply(message, 10 * server_round + k) for k, message in enumerate(instructions)]
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        excluded = metrics.get("softmerge-excluded", metrics.get("replies-excluded", 0))
        assert excluded == 0, (server_round, dict(metrics))
        state = arrays.to_torch_state_dict()
        for key, tensor in start.items():
            assert state[key].shape == tensor.shape and state[key].dtype == tensor.dtype, (server_round, key)
    count = state["1.num_batches_tracked"]
    assert count.dim() == 0 and count.dtype == torch.int64
    assert any(not torch.equal(state[key], start[key]) for key in start if key.startswith("0."))


def test_soft_merge_keeps_a_0d_numpy_buffer_0d():
    model = batchnorm_model()
    candidates = [{key: (value + 0.01 * k if value.is_floating_point() else value).numpy().copy()
                   for key, value in batchnorm_model(seed=k).state_dict().items()} for k in range(3)]
    merged, report = soft_merge(model, candidates, GATE, SoftMergeConfig(steps=2))
    assert not report.excluded
    assert merged["1.num_batches_tracked"].shape == () and merged["1.num_batches_tracked"].dtype == torch.int64


def _evaluate_reply(node: int, metrics: dict) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="evaluate")
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=instruction)


@pytest.mark.parametrize("name", list(_strategies()))
# Each odd reply's loss is 0.9 where it has one: averaged in rather than screened out, it would move the 0.5.
@pytest.mark.parametrize("odd", [{"eval-loss": 0.9, "num-examples": 10, "extra": 1.0},
                                 {"eval-loss": [0.9, 0.9], "num-examples": 10},
                                 {"eval-loss": math.nan, "num-examples": 10},
                                 {"eval-loss": 0.9, "num-examples": 0}])
def test_an_odd_evaluate_reply_is_screened_out_not_raised(name, odd):
    strategy = _strategies()[name]()
    replies = [_evaluate_reply(node, {"eval-loss": 0.5, "num-examples": 10}) for node in (1, 2, 3)]
    replies.append(_evaluate_reply(4, odd))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and math.isclose(metrics["eval-loss"], 0.5)
    # Nothing valid: no metrics, and still no exception.
    assert strategy.aggregate_evaluate(1, [_evaluate_reply(node, {"eval-loss": 0.5, "num-examples": 0})
                                           for node in (1, 2)]) is None


@pytest.mark.parametrize("name", ["fltrust", "centered-clipping", "geomed"])
def test_running_statistics_stay_within_the_clients_values(name):
    # FLTrust rescales each update to the server update's norm (a factor above 1 here), and
    # centered clipping carries last round's update over: applied to running_var, either
    # drove it below 0, and the broadcast model output NaN though every tensor was finite.
    from softmerge.aggregation.candidates import running_statistics

    statistics = running_statistics(batchnorm_model())
    assert statistics == ["1.running_mean", "1.running_var"]
    root = (0.05 * torch.randn(64, 3, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 2)
    strategy = {
        "fltrust": lambda: FLTrust(batchnorm_model(), root, epochs=4, learning_rate=0.5, batch_size=8,
                                   fraction_evaluate=0.0),
        "centered-clipping": lambda: CenteredClipping(tau=0.05, statistics=statistics, fraction_evaluate=0.0),
        "geomed": lambda: GeometricMedian(statistics=statistics, fraction_evaluate=0.0),
    }[name]()
    arrays = ArrayRecord(batchnorm_model().state_dict())
    for server_round in (1, 2, 3, 4):
        instructions = list(strategy.configure_train(server_round, arrays, ConfigRecord(), StubGrid(NODES)))
        replies = [_train_reply(message, 10 * server_round + k, scale=0.05, learning_rate=0.05)
                   for k, message in enumerate(instructions)]
        sent = [reply.content["arrays"].to_torch_state_dict() for reply in replies]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        state = arrays.to_torch_state_dict()
        for key in statistics:
            values = torch.stack([client[key] for client in sent])
            assert bool(((state[key] >= values.min(dim=0).values) & (state[key] <= values.max(dim=0).values)).all())
        assert bool((state["1.running_var"] >= 0).all())
        model = batchnorm_model()
        model.load_state_dict(state)
        model.eval()
        assert bool(torch.isfinite(model(root[0])).all()), server_round
