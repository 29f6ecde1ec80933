"""Flower's deployment runtime on loopback: SuperLink, three SuperNodes, one killed mid-run."""

import pytest

from softmerge.simulations.loopback import default_app_dir, run_loopback

pytestmark = pytest.mark.slow


def test_loopback_deployment_survives_a_killed_supernode():
    report = run_loopback(default_app_dir(), num_nodes=3, rounds=3, kill_node=2, round_timeout=60.0)
    assert report["status"] == "finished:completed", report
    assert report["ok"], report
    assert report["killed_after_round"] >= 1
    # The killed node's partition no longer reaches the merge; the run goes on without it.
    assert "client-2" not in report["candidates"][-1]
    assert report["accuracy"][-1] > report["accuracy"][0] + 0.3
    assert report["malicious_weight"] == [0.0] * 3  # partition 0 sends x1e30 updates
    assert report["left_running"] == []  # every process the deployment started is gone
