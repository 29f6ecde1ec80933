"""End to end through Flower's simulation engine on tiny digits federations."""

import json
from importlib import metadata

import pytest

from softmerge.server.results import load_results
from softmerge.simulations.config import parse_run_config
from softmerge.simulations.engine import run_experiment

pytestmark = pytest.mark.slow


def _run(tmp_path, name, num_clients=4, **config):
    config.setdefault("num-server-rounds", 2)
    settings = parse_run_config({**config, "output-dir": str(tmp_path / name)})
    run_experiment(settings, num_clients, log_file=tmp_path / f"{name}.log")
    return load_results(tmp_path / name)


def test_softmerge_learns_and_gates_out_the_malicious_client(tmp_path):
    result = _run(tmp_path, "softmerge", strategy="softmerge", attack="extreme", **{
        "malicious-partitions": "3", "extreme-values": "1e30", "fraction-evaluate": 0.5})
    assert result["status"] == "finished"
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["test_accuracy"] > rounds[0]["test_accuracy"] + 0.3
    for entry in rounds[1:]:
        gates = entry["gates"]
        assert "client-3" in gates["candidates"]
        malicious = gates["candidates"].index("client-3")
        assert all(row[malicious] == 0.0 for row in gates["weights"]), gates["weights"]
        assert len(gates["candidates"]) == 5  # four clients and the keep candidate
    log = (tmp_path / "softmerge.log").read_text()
    assert "SoftMerge round 2" in log
    # The build the figures came from, for a reader comparing runs made on other days.
    for package in ("flwr", "torch", "softmerge"):
        assert result["software"][package] == metadata.version(package)


def test_fedavg_collapses_under_the_same_attack(tmp_path):
    result = _run(tmp_path, "fedavg", strategy="fedavg", attack="extreme", **{
        "malicious-partitions": "3", "extreme-values": "1e30"})
    assert result["rounds"][2]["test_accuracy"] < 0.2
    loss = result["rounds"][2]["test_loss"]
    assert loss is None or loss > 10  # null when non-finite


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_flower_baselines_run_unchanged_by_config(tmp_path, strategy):
    result = _run(tmp_path, strategy, num_clients=4, strategy=strategy, attack="none",
                  **{"num-server-rounds": 1, "trim-beta": 0.25, "assumed-malicious": 0})
    assert result["status"] == "finished"
    assert result["rounds"][1]["test_accuracy"] > result["rounds"][0]["test_accuracy"]


def test_main_job_command_runs_end_to_end(tmp_path, capsys):
    from softmerge.simulations.cli import main

    code = main(["--rounds", "2", "--clients", "4", "--malicious", "3", "--extreme-values", "1e6",
                 "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fedavg-clean" in out and "softmerge-attack" in out and "SoftMerge final mixing weights" in out
    assert "weight on malicious candidates: 0.0000" in out
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failures"] == []
    assert summary["runs"]["fedavg-attack"]["final_accuracy"] < summary["runs"]["softmerge-attack"]["final_accuracy"]
    assert (tmp_path / "softmerge-attack" / "rounds.csv").read_text().startswith("round,test_accuracy")


@pytest.mark.parametrize("mode", ["raise", "empty", "timeout"])
def test_run_with_failing_clients_completes_and_keeps_learning(tmp_path, mode):
    # A timed-out client replies only after round-timeout; the round goes on without it.
    # 60 s leaves the others room to start and train on a loaded machine (at 30 s, with
    # four other simulations running, no reply came in time); the other modes get a
    # timeout no loaded machine reaches, so every reply is judged.
    timeout = 60.0 if mode == "timeout" else 600.0
    result = _run(tmp_path, "failing", num_clients=4, strategy="softmerge", attack="none", **{
        "num-server-rounds": 2, "client-failure-rate": 0.3, "client-failure-mode": mode, "round-timeout": timeout})
    assert result["status"] == "finished"
    accuracies = [r["test_accuracy"] for r in result["rounds"]]
    assert accuracies[-1] > accuracies[0] + 0.2
    used = [len(r["gates"]["candidates"]) - 1 for r in result["rounds"][1:]]
    assert min(used) < 4 and max(used) >= 1  # some round went on without every client
    if mode != "timeout":
        log = (tmp_path / "failing.log").read_text()
        assert ("error reply" if mode == "raise" else "empty reply") in log


def test_a_client_that_claims_a_million_examples_weighs_no_more_than_an_honest_one(tmp_path):
    # Partition 3 trains honestly (scaling by 1 sends its own model) but claims 10^6 examples.
    result = _run(tmp_path, "inflated", strategy="softmerge", attack="scaling", **{
        "malicious-partitions": "3", "attack-scale": 1.0, "attack-claimed-examples": 10**6,
        "softmerge-example-weights": True})
    assert result["status"] == "finished"
    assert result["rounds"][-1]["test_accuracy"] > result["rounds"][0]["test_accuracy"] + 0.3
    selected = 0
    for entry in result["rounds"][1:]:
        gates = entry["gates"]
        weights = gates["weights"][0]
        liar = gates["candidates"].index("client-3")
        selected += gates["gates"][0][liar] > 0.5
        honest = [k for k, label in enumerate(gates["candidates"]) if label.startswith("client-") and k != liar]
        assert sum(weights) == pytest.approx(1.0)
        # Uncapped, 10^6 against a few hundred would put all the weight on it.
        assert weights[liar] <= max(weights[k] for k in honest) + 1e-6, weights
    assert selected, "the honest-model liar was never selected, so its claim was never read"


def test_the_adaptive_backdoor_is_moved_by_the_harness_in_a_real_run(tmp_path):
    # Partition 3 trains the backdoor; the harness, holding its own clean sample, moves it. That
    # the move stays within the clean-loss bound is test_colluding's (backdoor_evade_moves_...).
    result = _run(tmp_path, "evade", strategy="fedavg", attack="backdoor-evade", **{"malicious-partitions": "3"})
    assert result["status"] == "finished"
    assert all(entry["backdoor_asr"] is not None for entry in result["rounds"])
    log = (tmp_path / "evade.log").read_text()
    for server_round in (1, 2):
        line = next(line for line in log.splitlines() if f"colluding backdoor-evade round {server_round}:" in line)
        assert "rewrote the replies of partitions [3] from 3 updates" in line
        scale = float(line.rsplit("scales [", 1)[1].rstrip("]"))
        assert 0.0 < scale <= 4.0  # some of the backdoor, at most model replacement's (n = 4)
