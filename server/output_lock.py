"""One run per output directory: an exclusive lock on ``<output-dir>/.lock``.

Two runs started on one output directory (the same command in two terminals, or two
benchmark grids that reach the same cell) would interleave their checkpoints and
results and leave files that belong to neither. The second now stops at once with
:class:`OutputBusy` instead.

The lock is a POSIX record lock (``fcntl.lockf``) on the whole file. The operating system
drops it when its process dies, so a killed run never leaves a stale lock behind. It
belongs to the process, not to an open file description as ``flock`` does: a descriptor
that leaked in this process (a Ctrl-C landing between two lines of a release) can never
lock this process out of its own output directory, and a child process does not inherit
it. Within one process the lock is therefore re-entrant, which the benchmark grid needs
(it holds a cell's lock while the server it starts takes it again), and a count of holders
keeps the descriptor open until the last one leaves: closing any descriptor of the file
releases the process's record locks on it, so nothing else here opens ``LOCK_FILE``.
Where ``fcntl`` does not exist, runs are not locked.
"""

from __future__ import annotations

import errno
import os
import threading
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
# The simulation's main thread and its ServerApp thread take and release one directory's
# lock around the same moment (at a Ctrl-C, both unwind at once); the count must not race.
_held_guard = threading.Lock()


class OutputBusy(RuntimeError):
    """Another process is running in this output directory."""


@contextmanager
def output_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s run lock for the block; raises :class:`OutputBusy` if another process has it."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    _acquire(key, directory)
    try:
        yield
    finally:
        _release(key)


def _acquire(key: Path, directory: Path) -> None:
    with _held_guard:
        if key in _held:
            handle, holders = _held[key]
            _held[key] = (handle, holders + 1)
            return
        if fcntl is None:
            _held[key] = (-1, 1)
            return
        handle = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(handle)
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise OutputBusy(f"another run is writing to {directory}; wait for it to end, or use another "
                             "output-dir") from None
        _held[key] = (handle, 1)


def _release(key: Path) -> None:
    with _held_guard:
        handle, holders = _held[key]
        if holders > 1:
            _held[key] = (handle, holders - 1)
            return
        del _held[key]
        if handle >= 0:
            os.close(handle)  # closing the descriptor releases the process's record lock


@contextmanager
def shared_files_lock(directory: Path) -> Iterator[None]:
    """Wait for, then hold, the lock under which processes read-merge-write ``directory``'s shared files.

    Two benchmark grids on one output each merge their cells into ``cells.json`` and their
    command line into ``grid.json``; without it, the one that writes second drops what the
    first wrote in between. Not re-entrant: do not nest it on one directory. (An ``flock``,
    unlike the run lock: it also keeps two threads of one process apart.)
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
