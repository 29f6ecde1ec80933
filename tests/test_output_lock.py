"""One run per output directory: a second run stops at once, and a dead run leaves no lock."""

import fcntl
import os
import subprocess
import sys

import pytest

from softmerge.server.output_lock import LOCK_FILE, OutputBusy, output_lock


def _held_elsewhere(directory):
    """The lock taken on an open file description other than output_lock's, as another process would."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise OutputBusy("held") from None
    return handle


def test_the_lock_is_exclusive_between_holders_and_reentrant_within_one(tmp_path):
    handle = _held_elsewhere(tmp_path)
    with pytest.raises(OutputBusy, match="another run is writing to"):
        with output_lock(tmp_path):
            pass
    os.close(handle)
    with output_lock(tmp_path):
        with output_lock(tmp_path):  # the grid holds a cell's lock while its server takes it
            pass
        with pytest.raises(OutputBusy):  # still held by the outer block
            os.close(_held_elsewhere(tmp_path))
    os.close(_held_elsewhere(tmp_path))  # released when the last holder left


def test_a_killed_run_leaves_no_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from softmerge.server.output_lock import output_lock; "
         "lock = output_lock(Path(sys.argv[1])); lock.__enter__(); print('held', flush=True); time.sleep(600)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusy):
            with output_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with output_lock(tmp_path):
        pass


def test_a_second_simulation_on_a_busy_output_stops_before_touching_it(tmp_path):
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.engine import run_experiment

    log = tmp_path / "flower.log"
    log.write_text("the running run's log")
    handle = _held_elsewhere(tmp_path)
    settings = parse_run_config({"num-server-rounds": 1, "output-dir": str(tmp_path)})
    with pytest.raises(OutputBusy):
        run_experiment(settings, 10, log_file=log)
    os.close(handle)
    assert log.read_text() == "the running run's log"
    assert not (tmp_path / "results.json").exists()


def test_the_grid_passes_over_a_cell_another_grid_is_running(tmp_path, capsys):
    from softmerge.simulations.grid import main

    handle = _held_elsewhere(tmp_path / "cells" / "fedavg__none__f0.5__s0")
    argv = ["--dataset", "digits", "--clients", "2", "--rounds", "1", "--strategies", "fedavg", "--attacks", "none",
            "--fractions", "0.5", "--no-oracle", "--output", str(tmp_path)]
    assert main(argv) == 0
    os.close(handle)
    assert "fedavg__none__f0.5__s0: running in another process; passed over" in capsys.readouterr().out
    assert not (tmp_path / "cells" / "fedavg__none__f0.5__s0" / "results.json").exists()
