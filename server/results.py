"""Per-round results: accuracy, loss, seconds and the round's gate report.

``results.json`` is rewritten atomically (write, then rename) after every round, so a
reader never sees half a file and a crash loses at most the round in flight.
``rounds.csv`` holds the scalar columns for spreadsheets and plots. Non-finite numbers
(a collapsed model's loss) are written as JSON null and CSV 'nan'.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..aggregation import GateReport
from .checkpoint import CheckpointError

CSV_COLUMNS = ("round", "test_accuracy", "test_loss", "backdoor_asr", "round_seconds", "aggregate_seconds",
               "gate_steps", "excluded", "replies_missing")


def software_versions() -> dict[str, str | None]:
    """The versions a run's figures depend on.

    Cells of one benchmark grid are often run across days, from different installs; with
    the versions in each results.json, a reader can tell which cells ran on the same build.
    ``None``: the package is not installed.
    """
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("softmerge", "flwr", "torch", "numpy", "scipy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(_json_safe(payload), handle, indent=1, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@dataclass
class ResultsWriter:
    """Collects one run's rounds and writes them to ``directory`` (if given)."""

    directory: Path | None
    settings: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    # The nodes connected when the run started (the simulation's client count): the run
    # config does not say how many clients took part, and a reader comparing runs must know.
    nodes: int | None = None
    software: dict[str, str | None] = field(default_factory=software_versions)
    # A resumed run's earlier versions, when they differ from this process's.
    earlier_software: list[dict[str, str | None]] = field(default_factory=list)
    _last_time: float = field(default_factory=time.perf_counter)

    def record(self, server_round: int, accuracy: float, loss: float, report: GateReport | None,
               aggregate_seconds: float | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        now = time.perf_counter()
        entry: dict[str, Any] = {
            "round": server_round,
            "test_accuracy": accuracy,
            "test_loss": loss,
            "round_seconds": now - self._last_time if server_round > 0 else 0.0,
            "aggregate_seconds": report.seconds if report is not None else aggregate_seconds,
            "gate_steps": report.steps if report is not None else None,
            "excluded": len(report.excluded) if report is not None else None,
        }
        entry.update(extra or {})
        if report is not None:
            entry["gates"] = report.to_dict()
        self._last_time = now
        self.rounds.append(entry)
        self.flush()
        return entry

    def restart_clock(self) -> None:
        """Time the next round from now: a resumed run's start-up is not part of its first round."""
        self._last_time = time.perf_counter()

    def resume(self, previous: dict[str, Any], done: int) -> None:
        """Continue ``previous`` (a loaded results.json) after its round ``done``.

        Its later rounds are dropped (the checkpoint is of round ``done``); the versions
        its rounds ran under are kept in ``earlier_software`` where they differ from this
        process's.
        """
        self.rounds = [entry for entry in previous.get("rounds", []) if entry["round"] <= done]
        earlier = previous.get("earlier_software")
        # A hand-edited or foreign results.json may hold anything here: keep only records.
        earlier = [*(earlier if isinstance(earlier, list) else []), previous.get("software")]
        self.earlier_software = []
        for software in earlier:
            if isinstance(software, dict) and software and software != self.software \
                    and software not in self.earlier_software:
                self.earlier_software.append(software)

    def flush(self, status: str = "running") -> None:
        if self.directory is None:
            return
        payload: dict[str, Any] = {"status": status, "settings": self.settings, "software": self.software}
        if self.nodes is not None:
            payload["nodes"] = self.nodes
        if self.earlier_software:
            payload["earlier_software"] = self.earlier_software
        write_json_atomic(self.directory / "results.json", {**payload, "rounds": self.rounds})
        temporary = self.directory / "rounds.csv.tmp"
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rounds)
        os.replace(temporary, self.directory / "rounds.csv")


def load_results(directory: str | os.PathLike) -> dict[str, Any]:
    with open(Path(directory) / "results.json", encoding="utf-8") as handle:
        return json.load(handle)


def load_results_to_resume(directory: str | os.PathLike, done: int) -> dict[str, Any]:
    """The results a run resuming after round ``done`` continues; :class:`CheckpointError` if unreadable.

    A checkpoint without its results would resume into a results.json missing every round
    before the restart, which tables would read as the whole run.
    """
    try:
        previous = load_results(directory)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory} holds a checkpoint of round {done} but its results.json cannot be read "
                              f"({type(error).__name__}: {error}); restore it, or delete the checkpoint to start "
                              "over") from error
    if not isinstance(previous, dict) or not isinstance(previous.get("rounds"), list):
        raise CheckpointError(f"{directory}/results.json holds no rounds to resume after round {done}; restore "
                              "it, or delete the checkpoint to start over")
    return previous
