"""One run per output directory: an exclusive lock on ``<output-dir>/.lock``.

Two runs started on one output directory (the same command in two terminals, or two
benchmark grids that reach the same cell) would interleave their checkpoints and
results and leave files that belong to neither. The second now stops at once with
:class:`OutputBusy` instead. The lock is ``flock`` on an open file, so the operating
system drops it when its process dies: a killed run never leaves a stale lock behind.
Within one process it is re-entrant (the benchmark grid holds a cell's lock while the
server it starts takes it again). Where ``fcntl`` does not exist, runs are not locked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_FILE = ".lock"
# Separate from LOCK_FILE: a run holds that one for its whole length, this one is held for
# the moment it takes to read, merge and write a directory's shared summary files.
SHARED_FILES_LOCK = ".shared-files.lock"
# Resolved directory -> (file descriptor, how many holders in this process).
_held: dict[Path, tuple[int, int]] = {}


class OutputBusy(RuntimeError):
    """Another process is running in this output directory."""


@contextmanager
def output_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s run lock for the block; raises :class:`OutputBusy` if another process has it."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    if key in _held:
        handle, holders = _held[key]
        _held[key] = (handle, holders + 1)
    elif fcntl is None:
        handle = -1
        _held[key] = (handle, 1)
    else:
        handle = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise OutputBusy(f"another run is writing to {directory}; wait for it to end, or use another "
                             "output-dir") from None
        _held[key] = (handle, 1)
    try:
        yield
    finally:
        handle, holders = _held[key]
        if holders > 1:
            _held[key] = (handle, holders - 1)
        else:
            del _held[key]
            if handle >= 0:
                os.close(handle)  # closing the descriptor releases the flock


@contextmanager
def shared_files_lock(directory: Path) -> Iterator[None]:
    """Wait for, then hold, the lock under which processes read-merge-write ``directory``'s shared files.

    Two benchmark grids on one output each merge their cells into ``cells.json`` and their
    command line into ``grid.json``; without it, the one that writes second drops what the
    first wrote in between. Not re-entrant: do not nest it on one directory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    handle = os.open(directory / SHARED_FILES_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)
