"""One run per output directory: a second run stops at once, and a dead run leaves no lock."""

import contextlib
import os
import subprocess
import sys
import threading

import pytest

from softmerge.server import output_lock as lock_module
from softmerge.server.output_lock import LOCK_FILE, OutputBusy, output_lock

# Each takes the run lock in another process, says so, and holds it until killed: by hand
# on the lock file, or through output_lock as another run would.
_BY_HAND = ("import fcntl, os, sys, time; handle = os.open(sys.argv[1] + '/' + sys.argv[2], os.O_RDWR | os.O_CREAT); "
            "fcntl.lockf(handle, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)")
_AS_A_RUN = ("import sys, time; from pathlib import Path; from softmerge.server.output_lock import output_lock; "
             "lock = output_lock(Path(sys.argv[1])); lock.__enter__(); print('held', flush=True); time.sleep(600)")


@contextlib.contextmanager
def _held_elsewhere(directory, holder_script=_BY_HAND):
    """The run lock held by another process for the block."""
    directory.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", holder_script, str(directory), LOCK_FILE],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait(timeout=60)
        holder.stdout.close()


def _free_for_another_process(directory):
    """Whether another process could take the run lock now."""
    probe = ("import fcntl, os, sys; handle = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
             "try:\n    fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except OSError:\n    sys.exit(3)")
    code = subprocess.run([sys.executable, "-c", probe, str(directory / LOCK_FILE)], timeout=60).returncode
    assert code in (0, 3)
    return code == 0


def test_the_lock_is_exclusive_between_processes_and_reentrant_within_one(tmp_path):
    with _held_elsewhere(tmp_path):
        with pytest.raises(OutputBusy, match="another run is writing to"):
            with output_lock(tmp_path):
                pass
    with output_lock(tmp_path):
        with output_lock(tmp_path):  # the grid holds a cell's lock while its server takes it
            pass
        assert not _free_for_another_process(tmp_path)  # still held by the outer block
    assert _free_for_another_process(tmp_path)  # released when the last holder left
    assert not lock_module._held


def test_a_killed_run_leaves_no_lock(tmp_path):
    with _held_elsewhere(tmp_path, _AS_A_RUN):  # the holder is killed on leaving the block
        with pytest.raises(OutputBusy):
            with output_lock(tmp_path):
                pass
    with output_lock(tmp_path):
        pass


def test_a_lock_forgotten_without_closing_its_descriptor_does_not_lock_this_process_out(tmp_path):
    """A Ctrl-C between forgetting a lock and closing its descriptor must not make the run unresumable."""
    lock_module._acquire(tmp_path.resolve(), tmp_path)
    # What a release cut short between its two steps leaves behind: forgotten, still open.
    leaked, _ = lock_module._held.pop(tmp_path.resolve())
    try:
        with output_lock(tmp_path):  # the resumed run, in the same process
            assert not _free_for_another_process(tmp_path)
        # Leaving released the process's lock on the file, the leaked descriptor's included.
        assert _free_for_another_process(tmp_path)
    finally:
        os.close(leaked)


def test_threads_taking_and_leaving_one_lock_at_once_leave_it_free(tmp_path):
    """The main thread and the ServerApp's thread unwind together at a Ctrl-C; no count may be lost."""
    start = threading.Barrier(8)
    failures = []

    def hold_and_leave():
        start.wait()
        try:
            for _ in range(1000):
                with output_lock(tmp_path):
                    with output_lock(tmp_path):
                        pass
        except BaseException as error:  # noqa: BLE001  (a thread's exception would not fail the test)
            failures.append(error)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to reach every interleaving
    try:
        threads = [threading.Thread(target=hold_and_leave) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous)
    assert failures == []
    assert not lock_module._held
    assert _free_for_another_process(tmp_path)


def test_a_second_simulation_on_a_busy_output_stops_before_touching_it(tmp_path):
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.engine import run_experiment

    log = tmp_path / "flower.log"
    log.write_text("the running run's log")
    settings = parse_run_config({"num-server-rounds": 1, "output-dir": str(tmp_path)})
    with _held_elsewhere(tmp_path):
        with pytest.raises(OutputBusy):
            run_experiment(settings, 10, log_file=log)
    assert log.read_text() == "the running run's log"
    assert not (tmp_path / "results.json").exists()


def test_the_grid_passes_over_a_cell_another_grid_is_running(tmp_path, capsys):
    from softmerge.simulations.grid import main

    argv = ["--dataset", "digits", "--clients", "2", "--rounds", "1", "--strategies", "fedavg", "--attacks", "none",
            "--fractions", "0.5", "--no-oracle", "--output", str(tmp_path)]
    with _held_elsewhere(tmp_path / "cells" / "fedavg__none__f0.5__s0"):
        assert main(argv) == 0
    assert "fedavg__none__f0.5__s0: running in another process; passed over" in capsys.readouterr().out
    assert not (tmp_path / "cells" / "fedavg__none__f0.5__s0" / "results.json").exists()
