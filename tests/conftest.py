"""Shared fixtures: a small trained digits federation whose candidates the tests merge."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(scope="module")
def benchmark_script(request):
    """The script benchmarks/<module's SCRIPT_NAME>.py, loaded as a module (benchmarks/ is not a package)."""
    name = request.module.SCRIPT_NAME
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def digits_task():
    from softmerge.simulations.tasks import load_task

    return load_task("digits", 200, 360, 0, "")


@pytest.fixture(scope="session")
def honest_candidates(digits_task):
    """A global MLP after three FedAvg rounds, and ten honest local models trained from it."""
    from softmerge.simulations.tasks import ArraySet, build_model, load_partition, train_model

    torch.manual_seed(0)
    model = build_model("digits", seed=0)
    partitions = [load_partition("digits", p, 10, seed=0) for p in range(10)]

    def local_models(global_state, round_seed):
        states = []
        for p, data in enumerate(partitions):
            local = build_model("digits")
            local.load_state_dict(global_state)
            train_model(local, ArraySet(data.x, data.y), epochs=2, learning_rate=0.1, batch_size=16,
                        seed=round_seed * 100 + p)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
        return states

    for round_seed in range(3):
        states = local_models(model.state_dict(), round_seed)
        model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return model, local_models(model.state_dict(), 3)


@pytest.fixture
def task_identity():
    """Messages are stamped with the running task's identity, which a ServerApp process sets."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
