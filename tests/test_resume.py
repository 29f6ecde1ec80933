"""Checkpoint and resume: a killed run restarted with the same config ends bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from softmerge.server.checkpoint import (
    CheckpointError,
    capture_rng_state,
    config_fingerprint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from softmerge.server.results import ResultsWriter, load_results, software_versions


def test_checkpoint_round_trip_and_rng_state(tmp_path):
    import random

    import torch

    arrays = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.bias": np.zeros(2, np.float32)}
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path, 4, arrays, "abc", {"gate_log_alpha": [[1.0]]})
    expected = (random.random(), np.random.rand(), float(torch.rand(1)))
    checkpoint = load_checkpoint(tmp_path, "abc")
    assert checkpoint.server_round == 4 and checkpoint.state["gate_log_alpha"] == [[1.0]]
    assert all(np.array_equal(checkpoint.arrays[k], v) for k, v in arrays.items())
    restore_rng_state(checkpoint.state["rng"])
    assert (random.random(), np.random.rand(), float(torch.rand(1))) == expected
    assert not list(tmp_path.glob("*.tmp"))
    assert capture_rng_state()["torch"]


def test_a_checkpoint_keeps_the_trust_record_in_its_order(tmp_path):
    # SoftMerge forgets the least recently gated nodes first, by the record's order.
    record = {"9": [1.0, 1.0, "client-9"], "10": [0.0, 1.0, "client-10"], "2": [0.5, 1.0, "client-2"]}
    save_checkpoint(tmp_path, 1, {"w": np.zeros(1, np.float32)}, "abc", {"trust_record": record})
    assert list(load_checkpoint(tmp_path, "abc").state["trust_record"]) == ["9", "10", "2"]


def test_checkpoint_of_another_config_or_damaged_is_refused(tmp_path):
    assert load_checkpoint(tmp_path, "abc") is None
    save_checkpoint(tmp_path, 1, {"w": np.ones(2, np.float32)}, "abc")
    with pytest.raises(CheckpointError, match="different config"):
        load_checkpoint(tmp_path, "xyz")
    (tmp_path / "checkpoint.npz").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path, "abc")


def test_a_refused_resume_names_the_keys_that_differ_and_how_to_start_over(tmp_path):
    ran = {"dataset": "digits", "softmerge-steps": 100, "seed": 0, "output-dir": "a"}
    save_checkpoint(tmp_path, 1, {"w": np.ones(2, np.float32)}, config_fingerprint(ran), run_config=ran)
    now = {**ran, "softmerge-steps": 50, "seed": 1, "output-dir": "b"}  # the output is not part of the run
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path, config_fingerprint(now), now)
    message = str(refused.value)
    assert "seed: 0 there, 1 here; softmerge-steps: 100 there, 50 here)" in message
    assert "output-dir" not in message.split(";")[0] and "resume=false" in message
    # The model file gone: that is what the error says, not the config.
    (tmp_path / "checkpoint.npz").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.npz is missing"):
        load_checkpoint(tmp_path, config_fingerprint(now), now)


@pytest.mark.parametrize("edit", [{"round": None}, {"round": -1}, {"round": "3"}, {"rng": None},
                                  {"rng": {"python": [3, [1], None], "torch": [1]}}, {"rng": {"numpy": 5}}])
def test_a_hand_damaged_checkpoint_state_is_refused_with_a_reason(tmp_path, edit):
    save_checkpoint(tmp_path, 2, {"w": np.ones(2, np.float32)}, "abc")
    path = tmp_path / "checkpoint.json"
    state = json.loads(path.read_text())
    for key, value in edit.items():
        state.pop(key) if value is None else state.update({key: value})
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="lacks a valid round number or random state"):
        load_checkpoint(tmp_path, "abc")


@pytest.mark.parametrize("renames_done", [0, 1])
def test_a_save_killed_between_or_before_its_renames_leaves_a_checkpoint_that_loads(tmp_path, monkeypatch,
                                                                                    renames_done):
    import softmerge.server.checkpoint as checkpoint

    save_checkpoint(tmp_path, 1, {"w": np.zeros(3, np.float32)}, "abc")
    real_replace, calls = os.replace, []

    def killed(source, destination):
        if len(calls) == renames_done:
            raise KeyboardInterrupt("killed")
        calls.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"w": np.ones(3, np.float32)}, "abc")
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    loaded = load_checkpoint(tmp_path, "abc")
    # Killed before any rename: the previous checkpoint is in force. Between the renames:
    # the new model is in place and its state, complete, is finished into place.
    assert loaded.server_round == 1 + renames_done
    assert np.array_equal(loaded.arrays["w"], np.full(3, float(renames_done), np.float32))
    assert json.loads((tmp_path / "checkpoint.json").read_text())["round"] == 1 + renames_done
    save_checkpoint(tmp_path, 3, {"w": np.full(3, 3.0, np.float32)}, "abc")
    assert load_checkpoint(tmp_path, "abc").server_round == 3


def test_a_pending_state_that_names_another_model_is_not_taken(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": np.ones(2, np.float32)}, "abc")
    (tmp_path / "checkpoint.json.tmp").write_text(json.dumps({"format": 1, "config": "abc", "round": 9,
                                                              "model_sha256": "0" * 64}))
    (tmp_path / "checkpoint.npz").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path, "abc")


def test_fingerprint_ignores_only_how_a_run_is_carried_out():
    """A run may resume elsewhere, or with a longer round timeout after its clients timed out."""
    base = {"seed": 0, "output-dir": "a", "round-timeout": 600.0, "softmerge-threads": 1, "resume": True}
    for key, other in {"output-dir": "b", "round-timeout": 1200.0, "softmerge-threads": 2, "resume": False,
                       "softmerge-trust-max-records": 50}.items():
        assert config_fingerprint(base) == config_fingerprint({**base, key: other})
    assert config_fingerprint(base) != config_fingerprint({**base, "seed": 1})


def _command(output):
    return [sys.executable, "-m", "softmerge.simulations.run", "--clients", "4",
            "--set", "num-server-rounds=3", "--set", "malicious-partitions=3", "--set", "extreme-values=1e6",
            "--set", f"output-dir={output}"]


@pytest.mark.slow
def test_killed_run_resumes_to_a_bit_identical_model(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    subprocess.run(_command(straight), check=True, capture_output=True, timeout=600)

    process = subprocess.Popen(_command(interrupted), start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    state_file = interrupted / "checkpoint.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if state_file.is_file() and json.loads(state_file.read_text())["round"] >= 1:
            break
        if process.poll() is not None:
            pytest.fail("the run ended before it could be interrupted")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    killed_at = json.loads(state_file.read_text())["round"]
    assert killed_at < 3

    resumed = subprocess.run(_command(interrupted), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log_text = (interrupted / "flower.log").read_text()
    assert f"resuming from the checkpoint of round {killed_at}" in log_text
    # Trust over rounds is on: the simulation's new node IDs take their clients' records.
    assert "4 of the 4 replying nodes took their client label's record" in log_text

    with np.load(straight / "checkpoint.npz") as a, np.load(interrupted / "checkpoint.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            assert np.array_equal(a[name], b[name]), name
    rounds_a = json.loads((straight / "results.json").read_text())["rounds"]
    rounds_b = json.loads((interrupted / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds_b] == [0, 1, 2, 3]
    assert [r["test_accuracy"] for r in rounds_a] == [r["test_accuracy"] for r in rounds_b]


def test_results_record_the_versions_and_a_resume_keeps_earlier_ones(tmp_path):
    from importlib import metadata

    first = ResultsWriter(tmp_path, {"strategy": "softmerge"})
    first.software = {**software_versions(), "flwr": "0.0.earlier"}
    for server_round in range(3):
        first.record(server_round, 0.5, 1.0, None)
    written = load_results(tmp_path)
    assert written["software"]["flwr"] == "0.0.earlier"
    assert "earlier_software" not in written

    resumed = ResultsWriter(tmp_path, {"strategy": "softmerge"})
    resumed.resume(written, done=1)
    resumed.record(2, 0.6, 0.9, None)
    after = load_results(tmp_path)
    assert [entry["round"] for entry in after["rounds"]] == [0, 1, 2]
    assert after["software"]["flwr"] == metadata.version("flwr")
    assert after["software"]["torch"] == metadata.version("torch")
    assert [software["flwr"] for software in after["earlier_software"]] == ["0.0.earlier"]

    # Resumed again under the same build: nothing new to keep, the earlier build still kept.
    again = ResultsWriter(tmp_path, {"strategy": "softmerge"})
    again.resume(after, done=2)
    again.flush()
    assert [software["flwr"] for software in load_results(tmp_path)["earlier_software"]] == ["0.0.earlier"]

    # A malformed record of versions is dropped, not a crash on resume.
    odd = ResultsWriter(tmp_path, {"strategy": "softmerge"})
    odd.resume({"rounds": [], "software": "1.0", "earlier_software": {"flwr": "x"}}, done=0)
    assert odd.earlier_software == []


@pytest.mark.slow
def test_trust_record_is_checkpointed_per_node(tmp_path):
    output = tmp_path / "trust"
    command = _command(output) + ["--set", "softmerge-trust=true", "--set", "num-server-rounds=2"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    record = json.loads((output / "checkpoint.json").read_text())["trust_record"]
    assert len(record) == 4  # one entry per node, keyed by node ID
    for opened, seen, _ in record.values():
        assert seen == pytest.approx(1.9)  # two rounds gated, memory 0.9
        assert 0 <= opened <= seen
    assert sorted(label for _, _, label in record.values()) == [f"client-{k}" for k in range(4)]
    gates = json.loads((output / "results.json").read_text())["rounds"][-1]["gates"]
    assert len(gates["trust"]) == len(gates["candidates"])


def _run_killed_in_round(tmp_path, kill_in_train_round: int, rounds: int):
    """A SoftMerge run of four EchoGrid nodes into ``tmp_path / "run"``, killed as that train round is sent."""
    from flower_helpers import EchoGrid
    from softmerge.server.app import run_server
    from softmerge.simulations.config import parse_run_config

    settings = parse_run_config({"num-server-rounds": rounds, "softmerge-steps": 4, "attack": "none",
                                 "malicious-partitions": "", "output-dir": str(tmp_path / "run")})
    with pytest.raises(KeyboardInterrupt):
        run_server(EchoGrid(4, kill_in_train_round=kill_in_train_round), settings, num_nodes=4)
    return settings


@pytest.mark.usefixtures("task_identity")
def test_a_run_killed_in_its_first_round_resumes_with_each_round_recorded_once(tmp_path):
    from flower_helpers import EchoGrid
    from softmerge.server.app import run_server

    settings = _run_killed_in_round(tmp_path, 1, rounds=2)
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["round"] == 0
    run_server(EchoGrid(4), settings, num_nodes=4)
    results = load_results(tmp_path / "run")
    assert results["status"] == "finished"
    assert [entry["round"] for entry in results["rounds"]] == [0, 1, 2]


@pytest.mark.usefixtures("task_identity")
def test_a_run_whose_runtime_stops_mid_round_ends_at_once_unfinished_and_resumes(tmp_path):
    # In a simulation a Ctrl-C ends Flower's runtime in the main thread while the ServerApp's
    # thread waits for replies: it must not wait out the round, record it, or mark the run
    # finished (a grid skips a finished cell for good).
    import threading

    from flower_helpers import EchoGrid
    from softmerge.server.app import RunStopped, run_server
    from softmerge.simulations.config import parse_run_config

    class StoppedInRound2(EchoGrid):
        """Serves train round 1, then the runtime dies: round 2's replies never come."""

        def __init__(self, stop):
            super().__init__(4)
            self.stop, self.release, self.waited_out = stop, threading.Event(), False

        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type.startswith("train") and self.train_rounds == 1:
                self.stop.set()
                self.release.wait()  # Flower's wait for replies that never come
                self.waited_out = True
                return []
            return super().send_and_receive(messages, timeout=timeout)

    settings = parse_run_config({"num-server-rounds": 3, "softmerge-steps": 4, "attack": "none",
                                 "malicious-partitions": "", "output-dir": str(tmp_path / "run"),
                                 "round-timeout": 600})
    stop = threading.Event()
    grid = StoppedInRound2(stop)
    with pytest.raises(RunStopped):
        run_server(grid, settings, num_nodes=4, stop=stop)
    assert not grid.waited_out  # it stopped while the round still waited for its replies
    grid.release.set()
    results = load_results(tmp_path / "run")
    assert results["status"] == "stopped"
    assert [entry["round"] for entry in results["rounds"]] == [0, 1]
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["round"] == 1
    run_server(EchoGrid(4), settings, num_nodes=4, stop=threading.Event())
    results = load_results(tmp_path / "run")
    assert results["status"] == "finished"
    assert [entry["round"] for entry in results["rounds"]] == [0, 1, 2, 3]


def _stopped_by_flwr_stop():
    from flwr.supercore.run import RunNotRunningException

    return RunNotRunningException()


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("raised", "status"), [(_stopped_by_flwr_stop, "stopped"),
                                                (lambda: ConnectionError("SuperLink gone"), "failed")])
def test_a_run_that_ends_by_an_exception_is_not_left_running(tmp_path, raised, status):
    # `flwr stop` makes the grid's next call raise Flower's RunNotRunningException; before,
    # results.json went on saying "running" after the run had ended.
    from flower_helpers import EchoGrid
    from softmerge.server.app import run_server
    from softmerge.simulations.config import parse_run_config

    class EndsInRound2(EchoGrid):
        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type.startswith("train") and self.train_rounds == 1:
                raise raised()
            return super().send_and_receive(messages, timeout=timeout)

    settings = parse_run_config({"num-server-rounds": 3, "softmerge-steps": 4, "attack": "none",
                                 "malicious-partitions": "", "output-dir": str(tmp_path / "run")})
    with pytest.raises(BaseException) as ended:
        run_server(EndsInRound2(4), settings, num_nodes=4)
    assert type(ended.value) is type(raised())
    results = load_results(tmp_path / "run")
    assert results["status"] == status and [entry["round"] for entry in results["rounds"]] == [0, 1]
    run_server(EchoGrid(4), settings, num_nodes=4)  # and the same command resumes it
    assert load_results(tmp_path / "run")["status"] == "finished"


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("strategy", ["softmerge", "fedavg", "geomed"])
def test_min_nodes_one_runs_on_a_single_node(tmp_path, strategy):
    # Flower's strategies wait for two nodes before every round; a lone SuperNode waited forever.
    from flower_helpers import EchoGrid
    from softmerge.server.app import run_server
    from softmerge.server.strategies import build_strategy
    from softmerge.simulations.config import parse_run_config, task_data
    from softmerge.simulations.tasks import build_model

    settings = parse_run_config({"num-server-rounds": 2, "softmerge-steps": 4, "attack": "none", "strategy": strategy,
                                 "malicious-partitions": "", "min-nodes": 1, "output-dir": str(tmp_path / "run")})
    built = build_strategy(settings, build_model("digits"), task_data(settings).gate.tensors())
    assert (built.min_available_nodes, built.min_train_nodes) == (1, 1)
    run_server(EchoGrid(1), settings, num_nodes=1)
    results = load_results(tmp_path / "run")
    assert results["status"] == "finished" and [entry["round"] for entry in results["rounds"]] == [0, 1, 2]


@pytest.mark.usefixtures("task_identity")
def test_centered_clipping_resumes_from_its_previous_aggregate(tmp_path):
    """Its reference point is the last round's aggregate: a resumed run must start from it, not from 0."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from torch import nn

    from flower_helpers import StubGrid, make_reply
    from softmerge.server.baselines import CenteredClipping

    torch.manual_seed(0)
    start = {k: v.detach().clone() for k, v in nn.Linear(3, 2).state_dict().items()}

    def play(strategy, server_round, global_state):
        noise = torch.Generator().manual_seed(server_round)
        replies = [make_reply(node, {k: v + torch.randn(v.shape, generator=noise) for k, v in global_state.items()},
                              partition=node) for node in range(1, 6)]
        list(strategy.configure_train(server_round, ArrayRecord(global_state), ConfigRecord(), StubGrid(range(1, 6))))
        return strategy.aggregate_train(server_round, replies)[0].to_torch_state_dict()

    def clipping():
        return CenteredClipping(tau=0.5, fraction_evaluate=0.0)

    straight = clipping()
    after_one = play(straight, 1, start)
    save_checkpoint(tmp_path, 1, {k: v.numpy() for k, v in after_one.items()}, "abc",
                    strategy_arrays=straight.checkpoint_arrays())
    after_two = play(straight, 2, after_one)

    checkpoint = load_checkpoint(tmp_path, "abc")
    assert set(checkpoint.arrays) == set(start)  # the strategy's arrays are not the model's
    resumed = clipping()
    resumed.restore_checkpoint_arrays(checkpoint.strategy_arrays)
    assert all(torch.equal(after_two[k], v) for k, v in play(resumed, 2, after_one).items())
    # Without it the second round differs: the check above is not vacuous.
    assert not all(torch.equal(after_two[k], v) for k, v in play(clipping(), 2, after_one).items())
    # A malformed record is ignored, not trusted.
    damaged = clipping()
    damaged.restore_checkpoint_arrays({"applied_update": np.full(3, np.nan)})
    assert damaged.applied_update is None


def test_a_checkpoint_without_the_update_centered_clipping_needs_is_named(caplog):
    """Checkpoints written before the update was saved resume from 0: said, not silent."""
    from softmerge.server.baselines import CenteredClipping

    CenteredClipping(reference="previous").restore_checkpoint_arrays({}, server_round=0)  # none yet: fine
    CenteredClipping(reference="zero").restore_checkpoint_arrays({}, server_round=5)  # never reads it
    assert "holds no applied update" not in caplog.text
    CenteredClipping(reference="previous").restore_checkpoint_arrays({}, server_round=5)
    assert "the checkpoint of round 5 holds no applied update" in caplog.text


@pytest.mark.slow
def test_a_stateful_colluding_attack_resumes_where_it_stopped(tmp_path, monkeypatch):
    """mimic-fixed's direction and target are checkpointed with the model, so a resumed run attacks alike."""
    from softmerge.server import app as server_app
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.engine import run_experiment

    def settings(name):
        return parse_run_config({"strategy": "fedavg", "attack": "mimic-fixed-2", "malicious-partitions": "3",
                                 "num-server-rounds": 3, "output-dir": str(tmp_path / name)})

    run_experiment(settings("straight"), 4, log_file=tmp_path / "straight.log")
    real_save = server_app.save_checkpoint

    def crash_in_round_two(directory, server_round, *args, **kwargs):
        if server_round == 2:
            raise RuntimeError("simulated crash before round 2's checkpoint")
        real_save(directory, server_round, *args, **kwargs)

    monkeypatch.setattr(server_app, "save_checkpoint", crash_in_round_two)
    with pytest.raises(RuntimeError):
        run_experiment(settings("interrupted"), 4, log_file=tmp_path / "crashed.log")
    monkeypatch.setattr(server_app, "save_checkpoint", real_save)
    with np.load(tmp_path / "interrupted" / "checkpoint.npz") as saved:
        assert {"strategy/adversary/direction", "strategy/adversary/target"} <= set(saved.files)
    assert json.loads((tmp_path / "interrupted" / "checkpoint.json").read_text())["round"] == 1

    run_experiment(settings("interrupted"), 4, log_file=tmp_path / "resumed.log")
    log_text = (tmp_path / "resumed.log").read_text()
    assert "resuming from the checkpoint of round 1" in log_text and "starts over" not in log_text
    # Flower's round banners name the run's rounds, not the resumed part's.
    assert "[ROUND 2/3]" in log_text and "[ROUND 3/3]" in log_text and "[ROUND 1/" not in log_text
    with np.load(tmp_path / "straight" / "checkpoint.npz") as a, \
            np.load(tmp_path / "interrupted" / "checkpoint.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        assert all(np.array_equal(a[name], b[name]) for name in a.files)


@pytest.mark.slow
def test_a_ctrl_c_during_a_simulation_leaves_it_unfinished_and_resumable(tmp_path, monkeypatch):
    """The interrupt ends Flower's runtime; the ServerApp's thread must end too, not wait out its rounds."""
    import os
    import signal
    import threading

    from softmerge.server import app as server_app
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.engine import run_experiment

    settings = parse_run_config({"strategy": "fedavg", "attack": "none", "malicious-partitions": "",
                                 "num-server-rounds": 2, "round-timeout": 600, "output-dir": str(tmp_path / "run")})
    real_save, real_app = server_app.save_checkpoint, server_app.make_server_app
    stops = []

    def remembering_stop(*args, stop=None, **kwargs):
        stops.append(stop)
        return real_app(*args, stop=stop, **kwargs)

    def interrupt_after_round_one(directory, server_round, *args, **kwargs):
        real_save(directory, server_round, *args, **kwargs)
        if server_round == 1:
            os.kill(os.getpid(), signal.SIGINT)  # a terminal's Ctrl-C
            # Round 2 goes out only once the main thread has taken the interrupt, so the run
            # cannot finish first however the threads are scheduled.
            stops[0].wait(timeout=300)

    monkeypatch.setattr(server_app, "make_server_app", remembering_stop)
    monkeypatch.setattr(server_app, "save_checkpoint", interrupt_after_round_one)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(settings, 4, log_file=tmp_path / "interrupted.log")
    monkeypatch.setattr(server_app, "save_checkpoint", real_save)
    assert stops[0].is_set()
    servers = [t for t in threading.enumerate() if "server_th" in t.name]
    for thread in servers:
        thread.join(timeout=120)  # it stops at once; before the fix it waited out round 2 (600 s)
    assert not any(thread.is_alive() for thread in servers)
    results = load_results(tmp_path / "run")
    assert results["status"] != "finished"
    assert [entry["round"] for entry in results["rounds"]] == [0, 1]
    run_experiment(settings, 4, log_file=tmp_path / "resumed.log")
    results = load_results(tmp_path / "run")
    assert results["status"] == "finished"
    assert [entry["round"] for entry in results["rounds"]] == [0, 1, 2]


@pytest.mark.parametrize("damage", ["missing", "not json", "no rounds"])
def test_a_checkpoint_whose_results_are_lost_is_refused_with_a_reason_and_the_grid_starts_it_over(tmp_path, damage):
    from softmerge.server.results import load_results_to_resume
    from softmerge.simulations.config import RunSettings, to_run_config
    from softmerge.simulations.grid import discard_unusable_checkpoint

    settings = RunSettings(output_dir=str(tmp_path))
    save_checkpoint(tmp_path, 2, {"w": np.ones(2, np.float32)}, config_fingerprint(to_run_config(settings)))
    if damage == "not json":
        (tmp_path / "results.json").write_text("{half a fi")
    elif damage == "no rounds":
        (tmp_path / "results.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(CheckpointError, match="round 2.*delete the checkpoint to start over"):
        load_results_to_resume(tmp_path, 2)
    # A cut-short save's temporary state goes too: loading would otherwise finish it later.
    (tmp_path / "checkpoint.json.tmp").write_text("{}")
    assert "results.json" in discard_unusable_checkpoint(tmp_path, settings)
    assert not any(tmp_path.glob("checkpoint.*"))


@pytest.mark.usefixtures("task_identity")
def test_a_simulation_resumed_with_another_client_count_is_refused(tmp_path):
    from flower_helpers import EchoGrid
    from softmerge.server.app import run_server

    settings = _run_killed_in_round(tmp_path, 2, rounds=3)
    with pytest.raises(CheckpointError, match="run with 4 clients, this run has 6; resume with 4"):
        run_server(EchoGrid(6), settings, num_nodes=6)
    # A deployment does not know its count in advance: the run's own is kept, with a warning.
    run_server(EchoGrid(6), settings)
    results = load_results(tmp_path / "run")
    assert results["status"] == "finished" and results["nodes"] == 4


@pytest.mark.usefixtures("task_identity")
def test_the_first_round_after_a_resume_is_timed_from_the_restart_not_the_start_up(tmp_path, monkeypatch):
    import softmerge.server.app as app
    import softmerge.server.results as results
    from flower_helpers import EchoGrid

    settings = _run_killed_in_round(tmp_path, 2, rounds=3)

    # A clock that jumps an hour while the restarted server loads its checkpoint (a slow start-up).
    real_clock, jumped = time.perf_counter, {"by": 0.0}
    monkeypatch.setattr(results.time, "perf_counter", lambda: real_clock() + jumped["by"])
    load = app.load_checkpoint

    def slow_start_up(*args, **kwargs):
        jumped["by"] = 3600.0
        return load(*args, **kwargs)

    monkeypatch.setattr(app, "load_checkpoint", slow_start_up)
    app.run_server(EchoGrid(4), settings, num_nodes=4)
    rounds = {entry["round"]: entry["round_seconds"] for entry in load_results(tmp_path / "run")["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3] and rounds[2] < 3600.0


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("strategy", ["softmerge", "fedavg", "fltrust"])
def test_a_run_in_which_no_client_reply_was_usable_fails_instead_of_finishing(tmp_path, strategy):
    from flwr.app import Error, Message

    from flower_helpers import EchoGrid
    from softmerge.server.app import NoClientUpdates, run_server
    from softmerge.simulations.config import parse_run_config

    class FailingClients(EchoGrid):
        """Every client fails to load its data, as with a client pool too small for them."""

        def send_and_receive(self, messages, timeout=None):
            return [Message(Error(code=1, reason="ValueError: the client pool holds 5 digits examples"),
                            reply_to=message) for message in messages]

    config = {"strategy": strategy, "num-server-rounds": 2, "softmerge-steps": 4, "attack": "none",
              "malicious-partitions": ""}
    failed = parse_run_config({**config, "output-dir": str(tmp_path / "failed")})
    with pytest.raises(NoClientUpdates, match="none of the 2 rounds put a client reply into the model"):
        run_server(FailingClients(4), failed, num_nodes=4)
    assert load_results(tmp_path / "failed")["status"] == "failed"
    # Run again, it resumes with no round left: still untrained, still failed.
    with pytest.raises(NoClientUpdates, match="none of the 2 rounds"):
        run_server(EchoGrid(4), failed, num_nodes=4)
    assert load_results(tmp_path / "failed")["status"] == "failed"
    # Rounds that trained before a restart count: failing clients afterwards do not undo them.
    resumed = parse_run_config({**config, "num-server-rounds": 3, "output-dir": str(tmp_path / "resumed")})
    with pytest.raises(KeyboardInterrupt):
        run_server(EchoGrid(4, kill_in_train_round=3), resumed, num_nodes=4)
    run_server(FailingClients(4), resumed, num_nodes=4)
    assert load_results(tmp_path / "resumed")["status"] == "finished"


@pytest.mark.usefixtures("task_identity")
def test_a_softmerge_run_whose_clients_never_beat_the_global_model_fails(tmp_path):
    """Finite, well-formed, useless models (a broken client build) end at weight 0 every round."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from flower_helpers import EchoGrid
    from softmerge.server.app import NoClientUpdates, run_server
    from softmerge.simulations.config import parse_run_config

    class UselessClients(EchoGrid):
        def send_and_receive(self, messages, timeout=None):
            replies = []
            for message in messages:
                noise = np.random.default_rng(message.metadata.dst_node_id)
                arrays = ArrayRecord({name: Array((noise.normal(0, 50, array.shape)).astype(np.float32))
                                      for name, array in message.content["arrays"].items()})
                metrics = MetricRecord({"train-loss": 0.5, "num-examples": 100})
                replies.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message))
            return replies

    settings = parse_run_config({"num-server-rounds": 2, "softmerge-steps": 4, "attack": "none",
                                 "malicious-partitions": "", "output-dir": str(tmp_path / "run")})
    with pytest.raises(NoClientUpdates, match="none of the 2 rounds put a client reply into the model"):
        run_server(UselessClients(4), settings, num_nodes=4)
    assert load_results(tmp_path / "run")["status"] == "failed"


@pytest.mark.usefixtures("task_identity")
def test_the_seed_fixes_which_nodes_a_deployment_samples(tmp_path):
    """Flower samples nodes with Python's random, by position in the node list; nodes that keep their IDs
    train alike in every run, whatever order they are listed in."""
    from flower_helpers import EchoGrid
    from softmerge.server.app import run_server
    from softmerge.simulations.config import parse_run_config

    class SampledNodes(EchoGrid):
        """Lists its nodes in an order of its own, as a SuperLink lists a set's."""

        def __init__(self, count, order):
            super().__init__(count)
            self.sampled, self.order = [], order

        def get_node_ids(self):
            import random

            return random.Random(self.order).sample(self.node_ids, len(self.node_ids))

        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type.startswith("train"):
                self.sampled.append(sorted(m.metadata.dst_node_id for m in messages))
            return super().send_and_receive(messages, timeout)

    def sampled(name, seed):
        import random

        random.seed(name)  # whatever state the process's random was left in
        grid = SampledNodes(8, order=name)
        run_server(grid, parse_run_config({"num-server-rounds": 4, "strategy": "fedavg", "fraction-train": 0.5,
                                           "seed": seed, "attack": "none", "malicious-partitions": "",
                                           "output-dir": str(tmp_path / name)}), num_nodes=8)
        return grid.sampled

    first = sampled("first", 0)
    assert len(first) == 4 and all(len(nodes) == 4 for nodes in first)
    assert sampled("second", 0) == first
    assert sampled("other-seed", 1) != first


@pytest.mark.usefixtures("task_identity")
def test_a_deployment_warns_when_its_malicious_ids_name_no_connected_node(tmp_path, caplog):
    """A simulation refuses such ids before it starts; a deployment's nodes may still connect,
    so its server says that the attack it records has fewer attackers than configured."""
    from flower_helpers import EchoGrid
    from softmerge.server.app import run_server
    from softmerge.simulations.config import parse_run_config

    settings = parse_run_config({"num-server-rounds": 1, "softmerge-steps": 4, "attack": "extreme",
                                 "malicious-partitions": "3,7,8", "output-dir": str(tmp_path / "run")})
    with caplog.at_level("WARNING"):
        run_server(EchoGrid(5), settings)
    assert "malicious partition ids [7, 8] are beyond the 5 nodes connected at the start" in caplog.text
    assert load_results(tmp_path / "run")["status"] == "finished"
