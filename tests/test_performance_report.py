"""benchmarks/performance.py's report, rendered from saved measurements (no timing is asserted)."""

import json
import math
import statistics
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT_NAME = "performance"


@pytest.fixture
def performance(benchmark_script):
    return benchmark_script


def _render(performance, tmp_path, raw):
    (tmp_path / "report.json").write_text(json.dumps(raw))
    assert performance.main(["--render-only", "--out", str(tmp_path / "report.md"),
                             "--accuracy-json", str(tmp_path / "absent.json")]) == 0
    return (tmp_path / "report.md").read_text()


def test_the_saved_run_renders_its_end_to_end_ratio_and_the_seconds_softmerge_adds(performance, tmp_path):
    raw = json.loads((REPO / "docs" / "performance.json").read_text())
    report = _render(performance, tmp_path, raw)
    assert report.startswith("# Performance of SoftMerge (issue 5)")
    assert "## Targets of issue 5" in report and "## End to end: the default simulation" in report
    fedavg = statistics.median(s for run in raw["e2e"] if run["label"] == "fedavg" for s in run["round_seconds"])
    soft = statistics.median(s for run in raw["e2e"] if run["label"] == "softmerge" for s in run["round_seconds"])
    assert f"ratio {soft / fedavg:.2f}, added {soft - fedavg:.3f} s." in report
    assert f"looks for the clients' replies every {performance.reply_poll_seconds()} s" in report
    assert f"Flower {raw['machine']['flwr']}'s `FedAvg`" in report
    # A run saved before the defaults were recorded does not claim today's.
    raw["machine"].pop("softmerge_defaults", None)
    assert "defaults: not recorded with this run" in _render(performance, tmp_path, raw)


def test_seconds_per_step_are_the_timed_gate_learning_and_older_runs_say_they_are_not(performance, tmp_path):
    main = {"steps": 50, "seconds": 10.0, "gate_seconds": 2.0}
    assert performance.seconds_per_step(main, {"seconds": 9.5}) == pytest.approx(0.04)
    # Saved before gate learning was timed: the difference of the two totals.
    assert performance.seconds_per_step({"steps": 50, "seconds": 10.0}, {"seconds": 9.5}) == pytest.approx(0.01)
    # No step taken: no cost per step to report.
    assert math.isnan(performance.seconds_per_step({"steps": 0, "seconds": 1.0, "gate_seconds": 0.0}, {"seconds": 1.0}))
    raw = json.loads((REPO / "docs" / "performance.json").read_text())
    current = _render(performance, tmp_path, raw)
    assert "each call's seconds learning gates (`GateReport.gate_seconds`, wall clock) / its own steps" in current
    assert "every call on a strategy of its own" in current
    for cell in raw["cells"]:
        for row in cell["rows"]:
            row.pop("gate_seconds", None)
            row.pop("seconds_per_step", None)
    older = _render(performance, tmp_path, raw)
    assert "this run predates the timing of gate learning itself" in older
    assert "this run called one strategy object for every repetition" in older
    for cell in raw["cells"]:
        for row in cell["rows"]:
            row["gate_seconds"] = 1.0 if row["steps"] else None
    timed = _render(performance, tmp_path, raw)
    assert "the seconds it spent learning gates (`GateReport.gate_seconds`" in timed
    assert "/ the last call's steps" in timed and "predates the timing" not in timed


def test_a_run_reports_the_defaults_it_measured_not_the_checkouts(performance, tmp_path):
    raw = json.loads((REPO / "docs" / "performance.json").read_text())
    raw["machine"]["softmerge_defaults"] = "as measured that day"
    assert "defaults: as measured that day." in _render(performance, tmp_path, raw)
    from softmerge.aggregation import SoftMergeConfig

    # What a new run records: the checkout's own defaults.
    config = SoftMergeConfig()
    assert f"lr {config.lr}, L0 {config.l0_lambda}, batch {config.batch_size}" in performance.softmerge_defaults()


def test_a_step_s_cost_is_each_timed_call_s_own_and_growth_is_read_on_log_log_axes(performance, tmp_path):
    # Two calls of 50 and 100 steps: 2 s / 50 and 3 s / 100, not the median time over the last call's steps.
    main = {"steps": 100, "seconds": 10.0, "gate_seconds": 2.5, "seconds_per_step": statistics.median([0.04, 0.03])}
    assert performance.seconds_per_step(main, {"seconds": 9.5}) == pytest.approx(0.035)
    assert performance._growth([10, 50, 100, 200], [2.0 * k for k in (10, 50, 100, 200)]) == pytest.approx(1.0)
    assert performance._growth([10, 50, 100, 200], [k * k for k in (10, 50, 100, 200)]) == pytest.approx(2.0)
    assert performance._growth([10, 100], [5.0, 5.0]) == pytest.approx(0.0)
    # The verdict reads the whole merge's exponent.
    report = _render(performance, tmp_path, json.loads((REPO / "docs" / "performance.json").read_text()))
    line = next(row for row in report.splitlines() if row.startswith("| time linear in K |"))
    assert "the merge grows as K^" in line and f"exponent at most {performance.LINEAR_POWER}" in line

