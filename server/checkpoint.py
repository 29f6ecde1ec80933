"""Checkpoints: the global model and everything needed to resume a run bit for bit.

After every round the server writes, atomically (write to a temporary name, fsync, then
rename):

- ``checkpoint.npz``: the global model's arrays (numpy's npz, no pickle), and under
  ``strategy/<name>`` any arrays the strategy carries from round to round (centered
  clipping's previous aggregate);
- ``checkpoint.json``: the round number, a fingerprint of the run config, the sha256 of
  the npz, the random states of Python, numpy and torch, and the last gate state.

Both new files are complete on disk before either is renamed, and the JSON names the npz's
hash. A crash between the two renames leaves the new npz next to the old JSON; loading then
finds the new JSON, still under its temporary name, naming that npz, and finishes the save
(renames it into place) instead of refusing a model it cannot vouch for. Loading uses
``np.load`` with ``allow_pickle=False`` and ``json``: nothing in a checkpoint can execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_FILE = "checkpoint.npz"
STATE_FILE = "checkpoint.json"
FORMAT_VERSION = 1
# Model parameter names are dotted module paths; a slash cannot be one of them.
STRATEGY_PREFIX = "strategy/"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used for this run."""


@dataclass
class Checkpoint:
    server_round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)


# Run-config keys that change how a run is carried out, not what it computes: a run may
# resume with a longer round timeout, say, after its clients timed out.
# The trust record's cap too: it changes nothing until the record outgrows it, and a server
# short of memory must be able to lower it and resume. And the nodes the server waits for: a
# deployment that lost a node must be able to lower it and resume (it sets a round's sample
# size only when fraction-train of the nodes is fewer; the scaling attacks' gamma then follows
# it, as it follows the replies such a round really averages).
OPERATIONAL_KEYS = frozenset({"output-dir", "resume", "round-timeout", "min-nodes", "softmerge-threads",
                              "softmerge-trust-max-records"})


def shaping_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape the run, in JSON form (where results go, or how long a round may wait, do not)."""
    return json.loads(json.dumps({k: v for k, v in sorted(run_config.items()) if k not in OPERATIONAL_KEYS},
                                 sort_keys=True, default=str))


def config_fingerprint(run_config: dict[str, Any]) -> str:
    """Hash of :func:`shaping_config`: two runs may share a checkpoint only if it is the same."""
    return hashlib.sha256(json.dumps(shaping_config(run_config), sort_keys=True).encode()).hexdigest()


def config_differences(stored: dict[str, Any], current: dict[str, Any], shown: int = 4) -> str:
    """The keys on which a checkpoint's recorded config and this run's differ, as ``key: was there, is here``."""
    unset = "(unset)"
    keys = sorted(key for key in set(stored) | set(current) if stored.get(key, unset) != current.get(key, unset))
    listed = [f"{key}: {stored.get(key, unset)!r} there, {current.get(key, unset)!r} here" for key in keys]
    return "; ".join(listed[:shown]) + (f"; and {len(listed) - shown} more" if len(listed) > shown else "")


def capture_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def arrays_under(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays whose names start with ``prefix``, by the rest of their names."""
    return {name[len(prefix):]: array for name, array in arrays.items() if name.startswith(prefix)}


def save_checkpoint(directory: Path, server_round: int, arrays: dict[str, np.ndarray], fingerprint: str,
                    extra: dict[str, Any] | None = None,
                    strategy_arrays: dict[str, np.ndarray] | None = None,
                    run_config: dict[str, Any] | None = None) -> None:
    """Write round ``server_round``'s checkpoint; ``run_config``, if given, is recorded so that a
    refused resume can name the keys that differ."""
    directory.mkdir(parents=True, exist_ok=True)
    model_tmp = directory / (MODEL_FILE + ".tmp")
    stored = {**arrays, **{STRATEGY_PREFIX + name: array for name, array in (strategy_arrays or {}).items()}}
    _fsync_write(model_tmp, lambda handle: np.savez(handle, **stored))
    state = {
        "format": FORMAT_VERSION,
        "round": server_round,
        "config": fingerprint,
        **({"config_values": shaping_config(run_config)} if run_config is not None else {}),
        "model_sha256": _sha256(model_tmp),
        "rng": capture_rng_state(),
        **(extra or {}),
    }
    state_tmp = directory / (STATE_FILE + ".tmp")
    _fsync_write(state_tmp, lambda handle: handle.write(json.dumps(state).encode()))
    os.replace(model_tmp, directory / MODEL_FILE)
    os.replace(state_tmp, directory / STATE_FILE)
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the renames themselves durable (POSIX); a no-op where directories cannot be opened."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint state")
    return state


def _finish_interrupted_save(directory: Path, model_hash: str | None) -> dict[str, Any] | None:
    """The new state of a save stopped between its two renames, renamed into place; else None."""
    pending = directory / (STATE_FILE + ".tmp")
    if model_hash is None or not pending.is_file():
        return None
    try:
        state = _read_state(pending)
    except CheckpointError:
        return None  # the save stopped while writing it: the files in place are the checkpoint
    if state.get("model_sha256") != model_hash:
        return None
    os.replace(pending, directory / STATE_FILE)
    _fsync_directory(directory)
    return state


def load_checkpoint(directory: Path, fingerprint: str, run_config: dict[str, Any] | None = None) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none.

    Raises :class:`CheckpointError` if it belongs to another config or is damaged, rather
    than silently starting over or resuming the wrong run. With ``run_config`` (this run's,
    whose fingerprint is ``fingerprint``) the error names the keys that differ, when the
    checkpoint recorded its own.
    """
    state_path, model_path = directory / STATE_FILE, directory / MODEL_FILE
    model_hash = _sha256(model_path) if model_path.is_file() else None
    state = _read_state(state_path) if state_path.is_file() else None
    if state is None or state.get("model_sha256") != model_hash:
        # A save stopped between its two renames left its new state, complete, under its
        # temporary name.
        state = _finish_interrupted_save(directory, model_hash) or state
    if state is None:
        return None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{state_path} has format {state.get('format')}, expected {FORMAT_VERSION}")
    start_over = f"delete {state_path.name} and {model_path.name}, or set resume=false, to start over"
    if model_hash is None or model_hash != state.get("model_sha256"):
        raise CheckpointError(f"{model_path} is missing or does not match {state_path}; {start_over}")
    if state.get("config") != fingerprint:
        stored = state.get("config_values")
        differing = (config_differences(stored, shaping_config(run_config))
                     if isinstance(stored, dict) and run_config is not None else "")
        raise CheckpointError(
            f"{directory} holds a checkpoint of a run with a different config"
            f"{f' ({differing})' if differing else ''}; resume it with that run's config, use another "
            f"output-dir, or {start_over}")
    server_round = state.get("round")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0 \
            or not _is_rng_state(state.get("rng")):
        raise CheckpointError(f"{state_path} lacks a valid round number or random state; {start_over}")
    with np.load(model_path, allow_pickle=False) as archive:
        stored = {name: archive[name] for name in archive.files}
    arrays = {name: array for name, array in stored.items() if not name.startswith(STRATEGY_PREFIX)}
    return Checkpoint(server_round=server_round, arrays=arrays, state=state,
                      strategy_arrays=arrays_under(stored, STRATEGY_PREFIX))


def _is_rng_state(state: object) -> bool:
    """Whether ``state`` has the shape :func:`capture_rng_state` writes (checked before anything is restored)."""
    if not isinstance(state, dict):
        return False
    python, numpy_state, torch_state = state.get("python"), state.get("numpy"), state.get("torch")
    return (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)
            and isinstance(numpy_state, list) and len(numpy_state) == 5 and isinstance(numpy_state[1], list)
            and isinstance(torch_state, list) and len(torch_state) > 0)


def recorded_nodes(checkpoint: Checkpoint) -> int | None:
    """The node count the checkpointed run started with, if it recorded one."""
    nodes = checkpoint.state.get("nodes")
    return nodes if isinstance(nodes, int) and not isinstance(nodes, bool) else None


def check_node_count(checkpoint: Checkpoint, num_nodes: int, directory: Path) -> None:
    """Raise :class:`CheckpointError` if a simulation of ``num_nodes`` clients would resume a run of another count.

    A simulation's client count shapes its partitions: resuming with another one would
    continue a different experiment under the same results.
    """
    recorded = recorded_nodes(checkpoint)
    if recorded is not None and recorded != num_nodes:
        raise CheckpointError(f"{directory} holds a checkpoint of a run with {recorded} clients, this run has "
                              f"{num_nodes}; resume with {recorded}, use another output-dir, or set resume=false "
                              "to start over")
