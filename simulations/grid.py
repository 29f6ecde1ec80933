"""softmerge-grid: the robustness benchmark grid, resumable, through Flower's simulation engine.

The grid is strategy x attack x malicious fraction x Dirichlet alpha x seed, at one
dataset and client count. Every cell is one federated run with its own results directory
(``cells/<key>/results.json``, the key ``<strategy>__<attack>__f<fraction>__s<seed>``,
then ``__a<alpha>`` unless alpha is the default 0.5); a cell whose results say
``finished`` is never run again, so an interrupted grid continues where it stopped.
Cells a rule cannot run (Bulyan needs n >= 4f + 3) are recorded as ``n/a``, not dropped.

With no attack, a rule that is not told the malicious count makes the same run at every
fraction (to the last digit): the first such cell run is reused for the other fractions,
its results copied with ``reused_from`` naming it.

The *oracle* cell of a setting is FedAvg over the honest clients alone with no attack:
what a perfect filter would reach.

Several grids may run on one output at once (one per core, say): each cell is locked
while it runs (:mod:`softmerge.server.output_lock`), and a grid passes over a cell another
is running. ``--jobs N`` starts N such grids as worker processes and, when the last one
ends, writes the tables and plots from every cell; grids started by hand each write the
tables from the cells they saw, and ``--tables-only`` after the last one writes them all.

Outputs, rewritten after every cell that runs: ``cells.csv`` and ``cells.json`` (one row
per cell) and ``tables.md`` (per alpha: final accuracy per attack, worst case over attacks,
backdoor attack success rate, SoftMerge's weight on malicious candidates). At the end, the PNG plots
(accuracy against round per defense, SoftMerge gate heatmaps) whose data changed.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from ..server.checkpoint import OPERATIONAL_KEYS
from ..server.output_lock import OutputBusy, output_lock, shared_files_lock
from ..server.results import write_json_atomic
from .config import (ConfigError, RunSettings, dataset_problem, node_count_problem, parse_run_config,
                     parse_set_options, replies_per_round)
from .tasks import forget_loaded_data

ORACLE = "oracle"
NO_ATTACK = "none"
# Cells at the run config's default alpha leave it out of their key, as every cell did
# before alpha became a dimension of the grid: those cells keep their names.
DEFAULT_ALPHA = RunSettings.dirichlet_alpha


@dataclass(frozen=True)
class Cell:
    strategy: str
    attack: str
    fraction: float
    seed: int
    alpha: float = DEFAULT_ALPHA

    @property
    def key(self) -> str:
        return f"{self.strategy}__{self.attack}__f{self.fraction:g}__s{self.seed}{alpha_suffix(self.alpha)}"


def alpha_suffix(alpha: float) -> str:
    """What a cell key or plot file name adds for ``alpha``: nothing at the default."""
    return "" if alpha == DEFAULT_ALPHA else f"__a{alpha:g}"


def alpha_title(alpha: float) -> str:
    """What a figure's title adds for ``alpha``: nothing at the default."""
    return "" if alpha == DEFAULT_ALPHA else f", alpha {alpha:g}"


def key_names_alpha(key: str) -> bool:
    """Whether a cell key ends in ``__a<alpha>`` (an attack name may start with "a": "alie")."""
    parts = key.split("__")
    return len(parts) > 4 and parts[-1].startswith("a")


def key_fraction(key: str) -> float:
    """The malicious fraction a cell key names (ValueError if it names none).

    Read from the end: an attack name may hold "__" or start with "f" ("fang").
    """
    parts = key.split("__")
    if key_names_alpha(key):
        parts = parts[:-1]
    if len(parts) < 4 or not parts[-2].startswith("f"):
        raise ValueError(f"not a cell key: {key!r}")
    return float(parts[-2][1:])


def malicious_ids(num_clients: int, fraction: float) -> list[int]:
    """The first round(f * n) partitions attack; the choice is fixed so every defense faces the same ones."""
    return list(range(int(round(fraction * num_clients))))


# Run-config keys that each cell sets itself (cell_settings), with the option that sets them.
CELL_KEYS = {"seed": "--seeds", "strategy": "--strategies", "attack": "--attacks", "dirichlet-alpha": "--alpha",
             "malicious-partitions": "--fractions (the first f*n partitions attack)",
             "assumed-malicious": "--fractions (rules are told the true count)",
             "exclude-malicious": "the oracle, which every grid adds unless --no-oracle",
             "output-dir": "--output"}


def check_fraction(fraction: float, num_clients: int) -> None:
    """A ConfigError unless ``fraction`` of ``num_clients`` is a whole number of clients, at least one.

    The tables are labelled by the fraction: 0.45 of 10 clients would run 4 attackers (as
    0.4 does) under a 45% label, and 0.04 of 20 would run none under an attack's name.
    """
    count = fraction * num_clients
    # A fraction written to six significant digits (1/3 as 0.333333, as the message below
    # prints them) is that many clients; 0.45 of 10 is not.
    if round(count) < 1 or abs(count - round(count)) > 1e-6 * num_clients + 1e-9:
        whole = ", ".join(f"{k / num_clients:g}" for k in range(1, min(num_clients, 5)))
        raise ConfigError(f"--fractions: {fraction:g} of {num_clients} clients is {count:g} clients; give a "
                          f"multiple of 1/{num_clients} (e.g. {whole}, ...)")


def not_applicable(cell: Cell, num_clients: int, replies: int | None = None) -> str | None:
    """Why the cell's rule cannot run, or None. ``replies``: a round's replies (default every client)."""
    problem = node_count_problem(cell.strategy, num_clients if replies is None else replies,
                                 len(malicious_ids(num_clients, cell.fraction)))
    if problem:
        return problem
    if cell.strategy == "fedtrimmedavg" and cell.fraction >= 0.5:
        return "the trimmed mean cannot trim a malicious majority"
    return None


def cell_settings(base: RunSettings, cell: Cell, num_clients: int, output: Path) -> RunSettings:
    attackers = malicious_ids(num_clients, cell.fraction)
    if cell.strategy == ORACLE:
        # The oracle runs FedAvg and the harness drops the malicious replies unseen.
        strategy, attack = "fedavg", NO_ATTACK
    else:
        strategy, attack = cell.strategy, cell.attack
    return replace(
        base, strategy=strategy, attack=attack, seed=cell.seed, dirichlet_alpha=cell.alpha,
        malicious_partitions=",".join(str(i) for i in attackers),
        assumed_malicious=len(attackers), exclude_malicious=cell.strategy == ORACLE,
        trim_beta=trim_beta_for(base.trim_beta, len(attackers), num_clients),
        output_dir=str(output / "cells" / cell.key),
    )


def trim_beta_for(configured: float, num_malicious: int, num_clients: int) -> float:
    """The trimmed mean's beta for a cell: at least the malicious share, as Krum is told the true f.

    Trimming fewer than f per side leaves attackers in every coordinate's mean, which
    measures a misconfigured rule rather than the trimmed mean. A share of one half or
    more cannot be trimmed (the cell is n/a), so the configured value stands there.
    """
    share = num_malicious / num_clients if num_clients else 0.0
    if share >= 0.5:
        return configured
    # Flower cuts int(beta * n) per side, and m / n * n can round to just under m (0.29 * 100).
    while int(share * num_clients) < num_malicious:
        share = math.nextafter(share, 1.0)
    return max(configured, share)


# Keys that only one rule reads: another rule's cell is the same run whatever they say.
RULE_KEYS = {"softmerge": ("softmerge-",), "fltrust": ("fltrust-",), "fedtrimmedavg": ("trim-beta",),
             "centered-clipping": ("cclip-",)}
# Keys added after cells were first recorded, with the value every run before them had: a
# cell that did not record one of these ran with that value. (``softmerge-beat-constant`` and
# ``softmerge-uninformed-merge`` are not here: their sessions, 33 and 37, reran the cells the
# new default changed and kept the others as its runs.)
LEGACY_VALUES = {"softmerge-example-weights": False, "attack-claimed-examples": 0, "softmerge-near-duplicates": 0.0,
                 "softmerge-mirror-trusted": 0.0, "softmerge-mirror-flipped": 0.0,
                 "softmerge-warm-step": "candidate", "softmerge-merge-step-share": "all",
                 "softmerge-trust-copies": True}


# The keys in which two cells that differ only in the malicious fraction differ.
FRACTION_KEYS = frozenset({"malicious-partitions", "assumed-malicious"})
# Rules told how many clients are malicious (f, or the trimmed mean's beta, see
# trim_beta_for): their no-attack run still depends on the fraction.
FRACTION_AWARE_RULES = frozenset({"krum", "multikrum", "bulyan", "fedtrimmedavg"})


def fraction_free(cell: Cell) -> bool:
    """Whether the cell's run is the same at every malicious fraction.

    With no attack the "malicious" clients train honestly and claim their true counts, and
    only the Krum family (the assumed count) and the trimmed mean (its beta) read the
    fraction; the oracle drops the malicious clients, so its run is the fraction's own.
    """
    return cell.attack == NO_ATTACK and cell.strategy != ORACLE and cell.strategy not in FRACTION_AWARE_RULES


# Keys a resumed run may change (server/checkpoint.py's OPERATIONAL_KEYS) that still move a
# merge's last bits: the merge's thread count (1 and 2 threads part from round 4 on,
# docs/performance.md "Session 31"), so the cells of one table must share it.
SHARED_IN_A_TABLE = frozenset({"softmerge-threads"})


def settings_mismatch(recorded: dict, expected: dict, ignored: frozenset[str] = frozenset()) -> dict[str, tuple]:
    """The run-config keys on which a finished cell's recorded settings differ from this grid's.

    Returns ``{key: (recorded, expected)}``; empty when the cell is the run this grid asks
    for. A key the cell did not record (it ran before the key existed) is not held against
    it unless ``LEGACY_VALUES`` says what it ran with and that differs; nor are keys only
    another rule reads, nor the ``ignored`` ones.
    """
    strategy = expected.get("strategy")
    foreign = tuple(prefix for rule, prefixes in RULE_KEYS.items() if rule != strategy for prefix in prefixes)
    differences = {}
    for key, value in expected.items():
        if key in OPERATIONAL_KEYS - SHARED_IN_A_TABLE or key in ignored or key.startswith(foreign):
            continue
        if key not in recorded:
            if key in LEGACY_VALUES and value != LEGACY_VALUES[key]:
                differences[key] = (LEGACY_VALUES[key], value)
            continue
        # Recorded settings come back through JSON, which round-trips floats exactly.
        if recorded[key] != value:
            differences[key] = (recorded[key], value)
    return differences


def read_json_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None if it is missing, unreadable, not text, not JSON or not an object.

    A cell's results are written by another process that may have been killed, or edited
    by hand: such a cell is simply not finished, and is run again.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError covers both bad UTF-8 and bad JSON
        return None
    return data if isinstance(data, dict) else None


def load_cell(output: Path, cell: Cell) -> dict | None:
    return read_json_object(output / "cells" / cell.key / "results.json")


def same_clients(result: dict, key: str, num_clients: int) -> bool:
    """Whether the finished run ``key`` (its results ``result``) can have had ``num_clients`` clients.

    Runs record the nodes they started with. Older ones did not; their malicious ids, the
    first round(f * n) partitions at the run's fraction f, must then be this count's.
    """
    if isinstance(result.get("nodes"), int):
        return result["nodes"] == num_clients
    recorded = (result.get("settings") or {}).get("malicious-partitions")
    try:
        fraction = key_fraction(key)
    except ValueError:
        return False
    return recorded == ",".join(str(i) for i in malicious_ids(num_clients, fraction))


def no_attack_twin(output: Path, cell: Cell, expected: dict, num_clients: int) -> tuple[str, dict] | None:
    """A finished run at another fraction that is this cell's run, if the cell is fraction-free.

    Returns ``(key, results)`` of the first such cell on disk that ran with ``num_clients``
    clients and whose recorded settings match ``expected`` (this cell's run config) up to
    the fraction keys, else None. Running it again would repeat the same computation to the
    last digit.
    """
    if not fraction_free(cell):
        return None
    pattern = f"{cell.strategy}__{NO_ATTACK}__f*__s{cell.seed}{alpha_suffix(cell.alpha)}"
    for directory in sorted((output / "cells").glob(pattern)):
        twin = read_json_object(directory / "results.json")
        # Only a run, never another copy: a copy outlives its source when that is deleted to run again.
        if twin is None or twin.get("reused_from"):
            continue
        recorded = twin.get("settings")
        if (directory.name != cell.key and twin.get("status") == "finished" and isinstance(recorded, dict)
                and same_clients(twin, directory.name, num_clients)
                and not settings_mismatch(recorded, expected, FRACTION_KEYS)):
            return directory.name, twin
    return None


def finished_cell(output: Path, cell: Cell) -> dict | None:
    """The cell's results if it is finished, else None.

    A copy of a no-attack twin counts only while its source is on disk, finished, with the
    same rounds: a source deleted to run again (after a change to a defense) takes its
    copies with it, and they are copied again from the new run.
    """
    result = load_cell(output, cell)
    if not result or result.get("status") != "finished":
        return None
    source = result.get("reused_from")
    if source:
        original = read_json_object(output / "cells" / str(source) / "results.json")
        if original is None or original.get("status") != "finished" \
                or original.get("rounds") != result.get("rounds"):
            return None
    return result


# The steadier accuracy figure: mean over this many last trained rounds.
LAST_ROUNDS = 3
# The long window of the summary table: the mean over this many last trained rounds, and the
# spread (standard deviation) of the accuracy over them, which says how far one cell's final
# round can land from where its run has settled.
LONG_WINDOW = 10
# The summary's statistics: (cells.csv column, label).
SUMMARY_STATISTICS = (("final_accuracy", "final round"), ("last3_accuracy", f"mean of last {LAST_ROUNDS}"),
                      ("last10_accuracy", f"mean of last {LONG_WINDOW}"))


def summarise_cell(cell: Cell, result: dict | None, num_clients: int, status: str, seconds: float | None) -> dict:
    row: dict = {"key": cell.key, "strategy": cell.strategy, "attack": cell.attack, "fraction": cell.fraction,
                 "alpha": cell.alpha, "seed": cell.seed, "status": status, "final_accuracy": None,
                 "last3_accuracy": None, "last10_accuracy": None, "spread10_accuracy": None, "final_backdoor_asr": None,
                 "malicious_weight": None, "seconds": seconds}
    if not result or not result.get("rounds"):
        return row
    rounds = result["rounds"]
    row["final_accuracy"] = rounds[-1].get("test_accuracy")
    # One seed's last round moves by a point or more from round to round; the mean of the
    # last three trained rounds is the steadier figure to compare defenses on.
    row["last3_accuracy"] = _mean([entry.get("test_accuracy") for entry in rounds[1:][-LAST_ROUNDS:]])
    # Labelled by its window, so a run shorter than the window has no such figure.
    window = [entry.get("test_accuracy") for entry in rounds[1:][-LONG_WINDOW:]]
    if len(window) == LONG_WINDOW:
        row["last10_accuracy"] = _mean(window)
        row["spread10_accuracy"] = _spread(window)
    row["final_backdoor_asr"] = rounds[-1].get("backdoor_asr")
    labels = {f"client-{i}" for i in malicious_ids(num_clients, cell.fraction)}
    shares = []
    for entry in rounds[1:]:
        gates = entry.get("gates")
        if gates and gates.get("units"):
            chosen = [k for k, label in enumerate(gates["candidates"]) if label in labels]
            shares.append(sum(sum(row_[k] for k in chosen) for row_ in gates["weights"]) / len(gates["units"]))
    if shares:
        row["malicious_weight"] = sum(shares) / len(shares)
    return row


def _present(values: list[float]) -> list[float]:
    """The values that are there: neither missing (None) nor nan."""
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _mean(values: list[float]) -> float | None:
    values = _present(values)
    return sum(values) / len(values) if values else None


def _spread(values: list[float]) -> float | None:
    """Standard deviation of the finite values; None for fewer than two.

    The population form: the rounds of the window are all there is to describe, not a
    sample to estimate a wider spread from.
    """
    values = _present(values)
    return statistics.pstdev(values) if len(values) > 1 else None


def format_percent(value: float | None, scale: float = 100.0, digits: int = 1) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value * scale) or abs(value * scale) >= 1e15:
        return f"{value * scale:.{digits}f}"
    # Half up on the decimal the value stands for: accuracies are multiples of 1/2000 and
    # their means land on exact halves (83.35), which a binary float puts on either side.
    exact = Decimal(repr(round(value * scale, 9)))
    return str(exact.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def row_alpha(row: dict) -> float:
    """A cells.json row's alpha; rows written before alpha was a dimension are at the default."""
    return float(row.get("alpha", DEFAULT_ALPHA))


def write_tables(rows: list[dict], strategies: list[str], attacks: list[str], fractions: list[float],
                 path: Path, header: str) -> None:
    """Write ``path``: the tables of ``rows`` (one alpha) under ``header``."""
    path.write_text("\n".join(table_lines(rows, strategies, attacks, fractions, header)))


def table_lines(rows: list[dict], strategies: list[str], attacks: list[str], fractions: list[float],
                header: str, heading_suffix: str = "") -> list[str]:
    """Markdown lines of every table of ``rows``, which must share one alpha.

    ``heading_suffix`` ends every table's heading (an alpha other than the default names
    itself there, so that no two headings of one page are the same).
    """
    by_key: dict[tuple, list[dict]] = {}
    for row in rows:
        by_key.setdefault((row["strategy"], row["attack"], row["fraction"]), []).append(row)

    def finished_values(strategy: str, attack: str, fraction: float, field: str) -> list[float]:
        return [r.get(field) for r in by_key.get((strategy, attack, fraction), [])
                if r["status"] == "finished" and r.get(field) is not None]

    def cell_text(strategy: str, attack: str, fraction: float, field: str = "final_accuracy") -> str:
        found = by_key.get((strategy, attack, fraction), [])
        if any(r["status"] == "n/a" for r in found):
            return "n/a"
        values = finished_values(strategy, attack, fraction, field)
        failed = sum(r["status"] == "failed" for r in found)
        if not values:
            return "failed" if failed else "-"
        # A failed seed is named: the mean of the others alone could hide the bad one.
        notes = ([f"±{format_percent(max(values) - min(values))}, {len(values)} seeds"] if len(values) > 1 else []) + (
            [f"{failed} failed"] if failed else [])
        return format_percent(_mean(values)) + (f" ({'; '.join(notes)})" if notes else "")

    attacked = [a for a in attacks if a != NO_ATTACK]

    lines = [header, ""]
    defenses = [s for s in strategies if s != ORACLE]
    lines += summary_tables(by_key, defenses, attacks, fractions, heading_suffix)
    accuracy_tables = (("final_accuracy", "Final test accuracy (%)"),
                       ("last3_accuracy", f"Test accuracy (%), mean of the last {LAST_ROUNDS} rounds"))
    for fraction in fractions:
        for field, title in accuracy_tables:
            lines += [f"### {title}, {fraction:.0%} malicious{heading_suffix}", ""]
            lines.append("| defense | " + " | ".join(attacks) + " | worst attack |")
            lines.append("|---|" + "---|" * (len(attacks) + 1))
            oracle = cell_text(ORACLE, NO_ATTACK, fraction, field)
            lines.append("| **oracle** (FedAvg, honest clients only) | " + " | ".join(oracle for _ in attacks)
                         + f" | {oracle} |")
            for strategy in defenses:
                texts = [cell_text(strategy, attack, fraction, field) for attack in attacks]
                # Over the attacks, as the summary: no attack is not a case of one.
                numbers = [_mean(found) for attack in attacked
                           if (found := finished_values(strategy, attack, fraction, field))]
                complete = len(numbers) == len(attacked) and not any_failed(by_key, strategy, fraction, attacked)
                if numbers:
                    worst = format_percent(min(numbers)) + ("" if complete else " (partial)")
                else:
                    worst = "n/a" if all(t == "n/a" for t in texts) else "-"
                lines.append(f"| {strategy} | " + " | ".join(texts) + f" | {worst} |")
            lines.append("")
    backdoor = [a for a in attacks if a.startswith("backdoor")]
    if backdoor:
        lines += [f"### Backdoor attack success rate (%), lower is better{heading_suffix}", ""]
        lines.append("| defense | " + " | ".join(f"{a} @ {f:.0%}" for a in backdoor for f in fractions) + " |")
        lines.append("|---|" + "---|" * (len(backdoor) * len(fractions)))
        for strategy in defenses:
            lines.append(f"| {strategy} | " + " | ".join(cell_text(strategy, a, f, "final_backdoor_asr")
                                                     for a in backdoor for f in fractions) + " |")
        lines.append("")
    if "softmerge" in strategies:
        lines += ["### SoftMerge: share of merged weight on malicious candidates (%, mean over rounds)"
                  + heading_suffix, ""]
        lines.append("| fraction | " + " | ".join(attacks) + " |")
        lines.append("|---|" + "---|" * len(attacks))
        for fraction in fractions:
            lines.append(f"| {fraction:.0%} | " + " | ".join(cell_text("softmerge", a, fraction, "malicious_weight")
                                                         for a in attacks) + " |")
        lines.append("")
    return lines


def within_a_point(accuracy: float, oracle: float) -> bool:
    """Whether ``accuracy`` is at least ``oracle`` - 1 point, unrounded (accuracies as fractions).

    1e-9: means of accuracies in 1/2000 steps are not exact floats.
    """
    return accuracy >= oracle - 0.01 - 1e-9


def any_failed(by_key: dict[tuple, list[dict]], strategy: str, fraction: float, attacks: list[str]) -> bool:
    """Whether a seed of ``strategy`` under one of ``attacks`` at ``fraction`` failed."""
    return any(r["status"] == "failed" for a in attacks for r in by_key.get((strategy, a, fraction), []))


def summary_tables(by_key: dict[tuple, list[dict]], defenses: list[str], attacks: list[str],
                   fractions: list[float], heading_suffix: str = "") -> list[str]:
    """Markdown lines: each defense's worst case over the attacks per fraction, by statistic.

    A cell reads "worst (k/n)": the lowest accuracy over the n attacks whose cells have
    finished (a cell's figure is the mean over its seeds), and how many of them are within 1
    point of the oracle's figure for the same statistic and fraction, compared unrounded.
    "partial" follows when an attack that can run at that fraction has no finished cell yet
    or one of its seeds failed, "failed"
    stands alone when only failed cells are there. "[1-2 seeds; oracle 3]" follows when the
    figures stand on more than one seed or on unequal numbers of them (the defense's attacks
    among themselves, or against the oracle's), which a grid still running its extra seeds
    has: the worst case then compares means over different seeds. One seed's final round
    lands a point or more from where its run has settled, for the oracle as much as for a
    defense, so the same comparison is shown on the means of the last rounds; a second table
    gives that spread.
    """
    def rows(strategy: str, attack: str, fraction: float) -> list[dict]:
        return by_key.get((strategy, attack, fraction), [])

    def value(strategy: str, attack: str, fraction: float, field: str) -> float | None:
        return _mean([r.get(field) for r in rows(strategy, attack, fraction) if r["status"] == "finished"])

    def missing_text(strategy: str, fraction: float, among: list[str]) -> str:
        here = [r for a in among for r in rows(strategy, a, fraction)]
        if here and all(r["status"] == "n/a" for r in here):
            return "n/a"
        return "failed" if any(r["status"] == "failed" for r in here) else "-"

    def finished_seeds(strategy: str, attack: str, fraction: float) -> int:
        return sum(r["status"] == "finished" for r in rows(strategy, attack, fraction))

    def seeds_text(strategy: str, fraction: float, among: list[str]) -> str:
        counts = [n for a in among if (n := finished_seeds(strategy, a, fraction))]
        oracle = finished_seeds(ORACLE, NO_ATTACK, fraction)
        if not counts or set(counts) == {oracle} == {1}:
            return ""
        low, high = min(counts), max(counts)
        return f" [{low}{'' if low == high else f'-{high}'} seed{'s' * (high > 1)}; oracle {oracle}]"

    attacked = [a for a in attacks if a != NO_ATTACK]
    if not attacked:
        return []
    columns = " | ".join(f"{f:.0%}" for f in fractions)
    lines = ["### Summary: worst case over the attacks (attacks within 1 point of the oracle / attacks finished)"
             + heading_suffix,
             "", f"| defense | statistic | {columns} |", "|---|---|" + "---|" * len(fractions)]
    for field, label in SUMMARY_STATISTICS:
        oracle = [value(ORACLE, NO_ATTACK, f, field) for f in fractions]
        lines.append(f"| **oracle** | {label} | " + " | ".join(format_percent(v) for v in oracle) + " |")
    for strategy in defenses:
        for field, label in SUMMARY_STATISTICS:
            texts = []
            for fraction in fractions:
                oracle = value(ORACLE, NO_ATTACK, fraction, field)
                found = [v for a in attacked if (v := value(strategy, a, fraction, field)) is not None]
                if not found:
                    texts.append(missing_text(strategy, fraction, attacked))
                    continue
                applicable = [a for a in attacked
                              if not any(r["status"] == "n/a" for r in rows(strategy, a, fraction))]
                text = format_percent(min(found))
                if oracle is not None:
                    close = sum(within_a_point(v, oracle) for v in found)
                    text += f" ({close}/{len(found)})"
                partial = len(found) < len(applicable) or any_failed(by_key, strategy, fraction, attacked)
                texts.append(text + (" partial" if partial else "")
                             + seeds_text(strategy, fraction, attacked))
            lines.append(f"| {strategy} | {label} | " + " | ".join(texts) + " |")
    lines += ["", f"### Round-to-round spread: standard deviation of test accuracy (points) over the last "
              f"{LONG_WINDOW} rounds, median over the attacks{heading_suffix}", "",
              f"| defense | {columns} |", "|---|" + "---|" * len(fractions)]
    for strategy in [ORACLE] + defenses:
        among = [NO_ATTACK] if strategy == ORACLE else attacked
        texts = []
        for fraction in fractions:
            spreads = [v for a in among if (v := value(strategy, a, fraction, "spread10_accuracy")) is not None]
            texts.append(format_percent(statistics.median(spreads), digits=2) if spreads
                         else missing_text(strategy, fraction, among))
        name = "**oracle**" if strategy == ORACLE else strategy
        lines.append(f"| {name} | " + " | ".join(texts) + " |")
    return lines + [""]


# Part of every figure's fingerprint: bump it when the drawing changes, so that every
# figure is drawn again rather than kept as it was.
PLOT_STYLE = 3
PLOTS_MANIFEST = "manifest.json"


def plot_cells(output: Path, cells: list[Cell], num_clients: int) -> None:
    """Draw the grid's plots: accuracy against round per attack and fraction, and for each
    SoftMerge cell its last round's client x unit weights and its weights by round.

    The accuracy figure draws every finished seed: a defense with one seed is its curve, a
    defense with several is the mean over them (over the rounds they all reached) with a
    band from the lowest to the highest seed, and its legend says how many. The weight
    figures are the first seed's.

    A figure is drawn again only when what it shows changed: ``plots/manifest.json`` keeps a
    fingerprint of each figure's data, and a figure whose fingerprint is unchanged (and whose
    file is still there) is kept. On the reference grid, drawing all ~200 figures took minutes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = output / "plots"
    plots.mkdir(exist_ok=True)
    manifest = _read_manifest(plots / PLOTS_MANIFEST)
    first_seed = min((c.seed for c in cells), default=0)
    shown = [c for c in cells if c.seed == first_seed and c.strategy == "softmerge"]
    results = {cell.key: finished_cell(output, cell) for cell in shown}
    # Only (round, accuracy) of each cell is kept: the results of every seed of the
    # reference grid, gates included, would be gigabytes.
    curves: dict[tuple[str, str, float, float], dict[int, dict[int, float]]] = {}
    for cell in cells:
        result = results.get(cell.key) if cell.key in results else finished_cell(output, cell)
        if result:
            curves.setdefault((cell.strategy, cell.attack, cell.fraction, cell.alpha), {})[cell.seed] = {
                r["round"]: r["test_accuracy"] for r in result["rounds"] if "test_accuracy" in r}

    def unchanged(name: str, data: object) -> bool:
        fingerprint = _fingerprint(data)
        if manifest.get(name) == fingerprint and (plots / name).is_file():
            return True
        manifest[name] = fingerprint
        return False

    def forget(name: str) -> None:
        (plots / name).unlink(missing_ok=True)
        manifest.pop(name, None)

    for attack, fraction, alpha in sorted({(c.attack, c.fraction, c.alpha) for c in cells if c.strategy != ORACLE}):
        name = f"accuracy__{attack}__f{fraction:g}{alpha_suffix(alpha)}.png"
        lines = []
        for strategy in _union([], (c.strategy for c in cells)):
            by_seed = curves.get((strategy, NO_ATTACK if strategy == ORACLE else attack, fraction, alpha))
            if by_seed:
                lines.append((strategy, *seed_band(list(by_seed.values()))))
        if not lines:
            forget(name)
            continue
        if unchanged(name, lines):
            continue
        figure, axis = plt.subplots(figsize=(7.5, 4))
        for strategy, numbers, mean, low, high, seeds in lines:
            label = strategy if seeds == 1 else f"{strategy} (mean of {seeds} seeds)"
            style = curve_style(strategy)
            axis.plot(numbers, mean, label=label, **style)
            if seeds > 1:
                axis.fill_between(numbers, low, high, color=style["color"], alpha=0.15, linewidth=0,
                                  zorder=style["zorder"] - 1)
        axis.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1),
                 title=f"{attack}, {fraction:.0%} malicious{alpha_title(alpha)}")
        axis.grid(alpha=0.3)
        # Beside the axes: inside them it hid the curves of whichever defenses it sat on.
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        figure.tight_layout()
        figure.savefig(plots / name, dpi=110)
        plt.close(figure)
    for cell in shown:
        result = results[cell.key]
        gates = result["rounds"][-1].get("gates") if result and result.get("rounds") else None
        heatmap = f"gates__{cell.attack}__f{cell.fraction:g}{alpha_suffix(cell.alpha)}.png"
        by_round = f"gates_by_round__{cell.attack}__f{cell.fraction:g}{alpha_suffix(cell.alpha)}.png"
        if not gates or not gates.get("units"):
            # A cell deleted to be rerun, or still running: its old heatmaps would show
            # another configuration's gates as this one's.
            forget(heatmap)
            forget(by_round)
            continue
        attackers = {f"client-{i}" for i in malicious_ids(num_clients, cell.fraction)}
        labels = [f"{c} *" if c in attackers else c for c in gates["candidates"]]
        numbers, weights = weights_by_round(result["rounds"], gates["candidates"])
        if not numbers:
            forget(by_round)
        elif not unchanged(by_round, [labels, numbers, weights]):
            _plot_weights_by_round(numbers, weights, labels, cell, plots / by_round)
        if unchanged(heatmap, [labels, gates["units"], gates["weights"]]):
            continue
        weights = np.array(gates["weights"]).T  # candidates x units
        figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(gates["units"]), 0.9 + 0.28 * len(labels)))
        image = axis.imshow(weights, cmap="viridis", aspect="auto", vmin=0)
        axis.set_xticks(range(len(gates["units"])), gates["units"], rotation=45, ha="right", fontsize=7)
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        axis.set_title(f"SoftMerge weights, {cell.attack} {cell.fraction:.0%}{alpha_title(cell.alpha)}, "
                       f"seed {cell.seed} (* malicious)", fontsize=8)
        figure.colorbar(image, ax=axis)
        figure.tight_layout()
        figure.savefig(plots / heatmap, dpi=110)
        plt.close(figure)
    write_json_atomic(plots / PLOTS_MANIFEST, dict(sorted(manifest.items())))


# One colour per defense in every figure (a paper's figures must agree); SoftMerge is drawn
# widest and on top, the oracle dashed in black, as the yardstick.
_CURVE_COLORS = {ORACLE: "black", "softmerge": "tab:red", "fltrust": "tab:blue", "fedavg": "tab:gray",
                 "fedmedian": "tab:purple", "fedtrimmedavg": "tab:brown", "krum": "tab:pink",
                 "multikrum": "tab:olive", "bulyan": "tab:cyan", "centered-clipping": "tab:green",
                 "geomed": "tab:orange"}


def curve_style(strategy: str) -> dict:
    """The line style of a defense's accuracy curve: the same colour in every figure."""
    return {"color": _CURVE_COLORS.get(strategy, "darkgoldenrod"),
            "linestyle": "--" if strategy == ORACLE else "-",
            "linewidth": 2.2 if strategy == "softmerge" else 1.3,
            "zorder": 4 if strategy in ("softmerge", ORACLE) else 2}


def seed_band(curves: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float], int]:
    """Rounds every seed reached, and the mean, lowest and highest accuracy over the seeds in each."""
    numbers = sorted(set.intersection(*(set(curve) for curve in curves)))
    columns = [[curve[number] for curve in curves] for number in numbers]
    return (numbers, [sum(column) / len(column) for column in columns], [min(column) for column in columns],
            [max(column) for column in columns], len(curves))


def _fingerprint(data: object) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([PLOT_STYLE, data], default=str).encode()).hexdigest()


def _read_manifest(path: Path) -> dict[str, str]:
    """The figures' fingerprints; empty (so every figure is drawn) if missing or unreadable."""
    return read_json_object(path) or {}


def weights_by_round(rounds: list[dict], candidates: list[str]) -> tuple[list[int], list[list[float]]]:
    """Each candidate's merged weight per round, averaged over the merge units: (round numbers,
    candidates x rounds). Rounds that gated a different candidate list (a client missing, an
    exclusion) are left out rather than misaligned."""
    shown = [r for r in rounds if r.get("gates") and r["gates"].get("candidates") == candidates]
    columns = [[sum(unit[k] for unit in r["gates"]["weights"]) / len(r["gates"]["weights"])
                for k in range(len(candidates))] for r in shown]
    return [r["round"] for r in shown], [list(row) for row in zip(*columns)]


def _plot_weights_by_round(numbers: list[int], weights: list[list[float]], labels: list[str], cell: Cell,
                           path: Path) -> None:
    """Candidate x round heatmap of :func:`weights_by_round`'s weights (rounds ``numbers``).

    The last round's client x unit heatmap shows where the weight went; this one shows when, which
    is how an attack that is held off for many rounds and then let in (a backdoor absorbed a little
    at a time) shows itself.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(1.5 + 0.22 * len(numbers), 0.9 + 0.28 * len(labels)))
    image = axis.imshow(np.array(weights), cmap="viridis", aspect="auto", vmin=0)
    axis.set_xticks(range(len(numbers)), numbers, fontsize=6)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    axis.set_xlabel("round", fontsize=7)
    axis.set_title(f"SoftMerge weight per round (mean over units), {cell.attack} {cell.fraction:.0%}"
                   f"{alpha_title(cell.alpha)}, seed {cell.seed} (* malicious)", fontsize=8)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    # No prefix abbreviations: a worker's command line is this one without --jobs, and "--job 2"
    # passed through to it would make every worker start workers of its own.
    parser = argparse.ArgumentParser(prog="softmerge-grid", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--alpha", default=f"{DEFAULT_ALPHA:g}",
                        help="Dirichlet alpha of the clients' partitions, one or a comma-separated list: a "
                        "dimension of the grid like --fractions (partitioning=dirichlet)")
    parser.add_argument("--strategies", default="softmerge,fedavg,fedmedian,fedtrimmedavg,krum,multikrum,bulyan")
    parser.add_argument("--attacks", default="none,sign-flip,extreme")
    parser.add_argument("--fractions", default="0.2,0.4")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--no-oracle", action="store_true", help="skip the oracle cells")
    parser.add_argument("--output", default="results/grid")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run-config key")
    parser.add_argument("--plan", action="store_true", help="list the cells and exit")
    parser.add_argument("--tables-only", action="store_true",
                        help="run nothing: rebuild cells.json, the tables and the plots from the cells on disk")
    parser.add_argument("--jobs", type=int, default=1,
                        help="grids to run at once on this output, one process each (a cell is locked while it "
                        "runs, so each takes the next free one); their logs go to <output>/workers/, and the "
                        "tables and plots are written from every cell when the last one ends (default 1)")
    # A worker of --jobs: it runs cells and leaves the plots to the grid that started it.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def plan_cells(strategies: list[str], attacks: list[str], fractions: list[float], seeds: list[int],
               oracle: bool, alphas: list[float] = (DEFAULT_ALPHA,)) -> list[Cell]:
    # The oracle of each setting first: every other cell is read against it.
    cells = ([Cell(ORACLE, NO_ATTACK, f, seed, alpha) for seed in seeds for alpha in alphas for f in fractions]
             if oracle else [])
    cells += [Cell(s, a, f, seed, alpha) for seed in seeds for alpha in alphas for f in fractions for a in attacks
              for s in strategies if s != ORACLE]
    return cells


def parse_alphas(text: str) -> list[float]:
    """``--alpha``'s values, in the order given, once each; a ConfigError unless there is one and each is > 0."""
    alphas = []
    for item in (part.strip() for part in str(text).split(",") if part.strip()):
        try:
            alpha = float(item)
        except ValueError:
            raise ConfigError(f"--alpha: {item!r} is not a number") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"--alpha: a Dirichlet alpha must be a finite number > 0, got {item!r}")
        if float(f"{alpha:g}") != alpha:
            # Cell keys name alpha to six significant digits: two alphas must not share one key.
            raise ConfigError(f"--alpha: give {item!r} to at most six significant digits (its cells would be named "
                              f"{alpha:g})")
        if alpha not in alphas:
            alphas.append(alpha)
    if not alphas:
        raise ConfigError("--alpha: give at least one Dirichlet alpha")
    return alphas


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        alphas = parse_alphas(args.alpha)
        config = {"dataset": args.dataset, "num-server-rounds": args.rounds, "dirichlet-alpha": alphas[0],
                  "partitioning": "dirichlet"}
        config.update(parse_set_options(args.set, reserved={key: f"the grid sets it per cell; use {option}"
                                                            for key, option in CELL_KEYS.items()}))
        base = parse_run_config(config)
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        for seed in seeds:
            parse_run_config({"seed": seed})
        for strategy in strategies:
            parse_run_config({"strategy": strategy})
        for attack in attacks:
            parse_run_config({"attack": attack})
        if any(not 0 < f < 1 for f in fractions):
            raise ConfigError(f"--fractions must lie in (0, 1), got {fractions}")
        for fraction in fractions:
            check_fraction(fraction, args.clients)
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    except (ConfigError, ValueError) as error:
        print(f"softmerge-grid: configuration error: {error}", file=sys.stderr)
        return 2

    output = Path(args.output)
    # grid.json's base: the settings every cell shares. Alpha is a cell's, as the fraction is
    # (its key and cells.json's alpha column name it; the invocations give the lists).
    recorded_config = {key: value for key, value in config.items() if key != "dirichlet-alpha"}
    # A rule's n is a round's replies: with fraction-train < 1, fewer than the clients.
    replies = replies_per_round(base, args.clients)
    cells = plan_cells(strategies, attacks, fractions, seeds, oracle=not args.no_oracle, alphas=alphas)
    if args.plan:
        for cell in cells:
            print(cell.key, not_applicable(cell, args.clients, replies) or "")
        print(f"{len(cells)} cells")
        return 0
    # Cells another invocation finished on this output go into the same tables: they must have
    # run with this grid's settings too, not only the cells it plans.
    planned = {cell.key for cell in cells}
    stale = stale_cells(output, cells, base, args.clients,
                        recorded=[c for c in recorded_cells(output) if c.key not in planned])
    if stale:
        print(f"softmerge-grid: {len(stale)} finished cell(s) in {output} ran with other settings than "
              "this grid's, so they cannot be reused or mixed into its tables:", file=sys.stderr)
        for key, differences in stale[:5]:
            shown = ", ".join(f"{name}: {was!r} there, {now!r} here" for name, (was, now) in differences.items())
            print(f"  {key}: {shown}", file=sys.stderr)
        if any("dirichlet-alpha" in differences and not key_names_alpha(key) for key, differences in stale):
            # Before alpha was a dimension of the grid, a cell's key did not name it.
            print(f"A cell at another alpha than {DEFAULT_ALPHA:g} whose key does not name it was made before alpha "
                  "was a dimension of the grid: rename its directory cells/<key> to cells/<key>__a<alpha> and run "
                  "--tables-only.", file=sys.stderr)
        print("Give this grid its own --output, or delete those cells' directories to run them again.",
              file=sys.stderr)
        return 2
    # Once, before any cell starts Flower, rather than once per cell in each cell's log; each
    # seed and alpha draws its own split of the pool among the clients.
    if not args.tables_only and not args.worker:
        if problem := dataset_problem(base):
            print(f"softmerge-grid: dataset error: {problem}", file=sys.stderr)
            return 2
        for alpha, seed in itertools.product(alphas, seeds):
            problem = dataset_problem(replace(base, dirichlet_alpha=alpha, seed=seed), args.clients)
            if problem:
                print(f"softmerge-grid: dataset error (seed {seed}, alpha {alpha:g}): {problem}", file=sys.stderr)
                return 2
        # The cells' clients load their own data; this process need not hold every seed's split.
        forget_loaded_data()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"softmerge-grid: cannot write to --output {output}: {error}", file=sys.stderr)
        return 2
    given = list(argv if argv is not None else sys.argv[1:])
    if args.jobs > 1 and not args.tables_only and not args.worker:
        record_invocation(output / "grid.json", given, recorded_config)
        runnable = [c for c in cells if not not_applicable(c, args.clients, replies)]
        failed_workers, unfinished = run_workers(given, args.jobs, output, runnable)
        code = main([*given, "--tables-only"])
        # The tables pass runs nothing, so only here is it known which cells did not finish.
        print(f"softmerge-grid: {len(runnable) - len(unfinished)} of {len(runnable)} runnable cells finished, "
              f"{len(unfinished)} not (failed, stopped, or run by another grid)"
              + (f": {', '.join(cell.key for cell in unfinished[:5])}{' ...' if len(unfinished) > 5 else ''}"
                 if unfinished else "")
              + (f"; {failed_workers} of {args.jobs} workers failed" if failed_workers else ""))
        return 1 if failed_workers or unfinished or code else 0
    if not args.tables_only and not args.worker:
        record_invocation(output / "grid.json", given, recorded_config)

    from tqdm import tqdm

    rows, failures = [], 0
    # How many rows the tables on disk hold, so that the final write happens only if rows were added since.
    rows_written = None
    tabled = strategies + ([ORACLE] if not args.no_oracle else [])
    progress = tqdm(cells, desc="grid", unit="cell", dynamic_ncols=True)
    for cell in progress:
        progress.set_postfix_str(cell.key)
        reason = not_applicable(cell, args.clients, replies)
        existing = finished_cell(output, cell)
        if reason:
            rows.append(summarise_cell(cell, None, args.clients, "n/a", None))
            continue
        if existing:
            rows.append(summarise_cell(cell, existing, args.clients, "finished", existing.get("seconds")))
            continue
        if args.tables_only:
            continue
        try:
            with output_lock(output / "cells" / cell.key):
                row, ran = _run_cell(cell, base, args.clients, output)
        except OutputBusy:
            # Another grid on this output is running it: its row is that grid's to write.
            tqdm.write(f"cell {cell.key}: running in another process; passed over")
            rows.append(summarise_cell(cell, None, args.clients, "running", None))
            continue
        rows.append(row)
        if ran and row["status"] != "finished":
            failures += 1
        # After every cell that ran, so that the tables are current if the grid is stopped;
        # cells passed over change nothing until the final write below.
        _write_outputs(output, rows, tabled, attacks, fractions, args, base, alphas)
        rows_written = len(rows)
    if rows_written != len(rows):
        _write_outputs(output, rows, tabled, attacks, fractions, args, base, alphas)
    if not args.worker:
        plot_cells(output, cells, args.clients)
    if args.tables_only:
        print(f"softmerge-grid: tables of {len(rows)} cells, none run here; tables: {output / 'tables.md'}")
    else:
        print(f"softmerge-grid: {len(rows)} cells, {failures} failed; tables: {output / 'tables.md'}")
    return 1 if failures else 0


def run_workers(argv: list[str], jobs: int, output: Path, runnable: list[Cell]) -> tuple[int, list[Cell]]:
    """Run ``jobs`` copies of this grid as worker processes.

    Returns how many workers failed and the runnable cells still not finished when the
    last one ended (a failed cell, or one another grid held).

    Each worker walks the same cells and runs the first one no other worker holds, so the
    cells spread over the workers without a scheduler. One progress bar counts the
    finished cells on disk.
    """
    import subprocess

    from tqdm import tqdm

    logs = output / "workers"
    logs.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "softmerge.simulations.grid", *_without_jobs(argv), "--worker"]
    workers = []
    for index in range(jobs):
        with open(logs / f"{index}.log", "w") as log:
            workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    progress = tqdm(total=len(runnable), desc=f"grid ({jobs} jobs)", unit="cell", dynamic_ncols=True)
    waiting = list(runnable)
    while True:
        running = [worker for worker in workers if worker.poll() is None]
        # A finished cell stays finished: only the others are read again.
        waiting = [cell for cell in waiting if finished_cell(output, cell) is None]
        progress.n = len(runnable) - len(waiting)
        progress.set_postfix_str(f"{len(running)} workers running")
        progress.refresh()
        if not running:
            break
        time.sleep(5)
    progress.close()
    failed = [index for index, worker in enumerate(workers) if worker.returncode != 0]
    for index in failed:
        print(f"softmerge-grid: worker {index} ended with {workers[index].returncode}; see {logs / f'{index}.log'}",
              file=sys.stderr)
    return len(failed), waiting


def _without_jobs(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--jobs":
            skip = True
        elif not item.startswith("--jobs="):
            kept.append(item)
    return kept


def _run_cell(cell: Cell, base: RunSettings, num_clients: int, output: Path) -> tuple[dict, bool]:
    """Run one unfinished cell, or copy its no-attack twin; returns (its row, whether it ran).

    The caller holds the cell's lock.
    """
    from tqdm import tqdm

    from .config import to_run_config
    from .engine import run_experiment

    directory = output / "cells" / cell.key
    if finished := finished_cell(output, cell):
        # Another grid on this output finished it while this one was on its way here.
        return summarise_cell(cell, finished, num_clients, "finished", finished.get("seconds")), False
    settings = cell_settings(base, cell, num_clients, output)
    if twin := no_attack_twin(output, cell, to_run_config(settings), num_clients):
        source, result = twin
        # An interrupted run of this cell is not needed any more.
        remove_checkpoint(directory)
        # The twin's results keep the settings it recorded, and say where they came from.
        write_json_atomic(directory / "results.json", {**result, "reused_from": source})
        tqdm.write(f"cell {cell.key}: the same run as {source} (no attack, fraction-free rule), reused")
        return summarise_cell(cell, result, num_clients, "finished", 0.0), False
    unusable = discard_unusable_checkpoint(directory, settings)
    if unusable:
        tqdm.write(f"cell {cell.key}: its interrupted run cannot be resumed ({unusable}); starting over")
    started = time.perf_counter()
    try:
        # A failed cell keeps its directory (with whatever log it wrote), and with it its row.
        directory.mkdir(parents=True, exist_ok=True)
        run_experiment(settings, num_clients, log_file=directory / "flower.log")
        result = load_cell(output, cell)
        status = result.get("status", "failed") if result else "failed"
    except Exception as error:  # noqa: BLE001  (one failed cell must not stop the grid)
        result, status = None, "failed"
        tqdm.write(f"cell {cell.key} failed: {type(error).__name__}: {error}")
    return summarise_cell(cell, result, num_clients, status, time.perf_counter() - started), True


def remove_checkpoint(directory: Path) -> None:
    """Delete a cell's checkpoint files, if any."""
    from ..server.checkpoint import MODEL_FILE, STATE_FILE

    # With the temporary files of a save that was cut short, which loading would otherwise finish.
    for name in (STATE_FILE, MODEL_FILE, STATE_FILE + ".tmp", MODEL_FILE + ".tmp"):
        (directory / name).unlink(missing_ok=True)


def discard_unusable_checkpoint(directory: Path, settings: RunSettings) -> str | None:
    """Delete an unfinished cell's checkpoint that its run cannot resume; returns why, or None.

    An interrupted cell resumes from its checkpoint, which the server refuses if it belongs
    to another run config (an upgrade that adds a run-config key changes every config), is
    damaged, or has lost its results.json. The grid owns its cell directories, so it starts such a cell over rather than
    fail it at every attempt.
    """
    from ..server.checkpoint import CheckpointError, config_fingerprint, load_checkpoint
    from ..server.results import load_results_to_resume
    from .config import to_run_config

    try:
        checkpoint = load_checkpoint(directory, config_fingerprint(to_run_config(settings)))
        if checkpoint is not None:
            load_results_to_resume(directory, checkpoint.server_round)
    except CheckpointError as error:
        remove_checkpoint(directory)
        # The server's advice (another output-dir, or delete the checkpoint) is what was just done.
        return "its checkpoint is of another run config" if "different config" in str(error) else str(error)
    return None


def stale_cells(output: Path, cells: list[Cell], base: RunSettings, num_clients: int,
                recorded: list[Cell] = ()) -> list[tuple[str, dict]]:
    """The finished cells on disk whose recorded settings are not the run this grid would make.

    The cell key names strategy, attack, fraction, seed and alpha only; everything else (a changed
    ``--set``, another dataset, round or client count) would otherwise pass a stale cell off
    as done. ``cells`` are this grid's (one that cannot run here is not held against it);
    ``recorded``, the finished cells other grids put in this output's tables, are checked
    even where this grid could not run them (another client count, say).
    """
    from .config import to_run_config

    stale = []
    replies = replies_per_round(base, num_clients)
    for cell, planned in [*((cell, True) for cell in cells), *((cell, False) for cell in recorded)]:
        existing = finished_cell(output, cell)
        if not existing or (planned and not_applicable(cell, num_clients, replies)):
            continue
        recorded = existing.get("settings")
        if not isinstance(recorded, dict):
            continue  # written before cells recorded their settings: nothing to check against
        expected = to_run_config(cell_settings(base, cell, num_clients, output))
        differences = settings_mismatch(recorded, expected, FRACTION_KEYS if fraction_free(cell) else frozenset())
        if not same_clients(existing, existing.get("reused_from") or cell.key, num_clients):
            differences["clients"] = (existing.get("nodes", "unrecorded, malicious ids of another count"),
                                      num_clients)
        if differences:
            stale.append((cell.key, differences))
    return stale


def record_invocation(path: Path, argv: list[str], config: dict) -> None:
    """Add this command line to grid.json's list of those that filled the grid, once each."""
    with shared_files_lock(path.parent):
        previous = read_json_object(path) or {}
        invocations = previous.get("invocations") or ([previous["argv"]] if previous.get("argv") else [])
        if not isinstance(invocations, list):
            invocations = []
        if list(argv) not in invocations:
            invocations.append(list(argv))
        write_json_atomic(path, {"base": config, "invocations": invocations})


def _write_outputs(output: Path, rows: list[dict], strategies: list[str], attacks: list[str],
                   fractions: list[float], args: argparse.Namespace, base: RunSettings,
                   alphas: list[float] = (DEFAULT_ALPHA,)) -> None:
    # Other grids on this output merge their cells into the same files.
    with shared_files_lock(output):
        _merge_and_write_outputs(output, rows, strategies, attacks, fractions, args, base, alphas)


def _merge_and_write_outputs(output: Path, rows: list[dict], strategies: list[str], attacks: list[str],
                             fractions: list[float], args: argparse.Namespace, base: RunSettings,
                             alphas: list[float]) -> None:
    # Several invocations may fill one grid (say, the 40% column first): keep every cell,
    # except a finished one whose directory has since been deleted to be run again (after a
    # change to a defense): its old figures no longer describe anything on disk.
    merged: dict[str, dict] = {}
    try:
        recorded = json.loads((output / "cells.json").read_text())
        if not isinstance(recorded, list):
            raise TypeError(f"a list of rows was expected, not {type(recorded).__name__}")
        # The tables group rows by defense, attack and fraction: a row that does not name its
        # cell (edited by hand, or cut short) has nowhere to go. This grid's own cells are read
        # from disk again below.
        unplaced = [row.get("key") if isinstance(row, dict) else row for row in recorded if _row_cell(row) is None]
        if unplaced:
            print(f"softmerge-grid: {output / 'cells.json'} has rows that do not name their cell, left out of "
                  f"the tables: {', '.join(map(str, unplaced))}", file=sys.stderr)
        merged = {row["key"]: row for row in recorded if _row_cell(row) is not None and _still_there(output, row)}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError, TypeError) as problem:  # ValueError: bad JSON or not UTF-8
        print(f"softmerge-grid: {output / 'cells.json'} is unreadable ({problem}); it is written again from "
              "this grid's cells (--tables-only with the other grids' settings lists theirs again)", file=sys.stderr)
    for row in rows:
        previous = merged.get(row["key"])
        if row.get("status") != "finished" and previous and previous.get("status") == "finished":
            continue  # another grid finished it after this one passed over it (or saw it running)
        if row.get("seconds") is None and previous and previous.get("status") == row["status"]:
            # A finished cell passed over again keeps the time it took when it ran.
            row = {**row, "seconds": previous.get("seconds")}
        merged[row["key"]] = row
    for key, row in merged.items():
        if row.get("status") == "finished" and "last10_accuracy" not in row:
            merged[key] = _resummarised(output, row, args.clients)
    # A row written before alpha was a column ran at the default (its key says so).
    rows = [row if "alpha" in row else {**row, "alpha": DEFAULT_ALPHA} for row in merged.values()]
    planned_strategies, planned_attacks = strategies, attacks
    strategies = _union(strategies, (r["strategy"] for r in rows))
    attacks = _union(attacks, (r["attack"] for r in rows if r["strategy"] != ORACLE))
    write_json_atomic(output / "cells.json", rows)  # a kill mid-write must not cost the other grids' rows
    with open(output / "cells.csv", "w", newline="") as handle:
        # Rows written by an older runner may lack a newer column: the header is the union.
        writer = csv.DictWriter(handle, fieldnames=_union([], (key for row in rows for key in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    # One set of tables per alpha, the default first: each with the defenses, attacks and
    # fractions this grid planned at it or any grid ran at it, and no others.
    for alpha in sorted({row_alpha(r) for r in rows} | set(alphas), key=lambda a: (a != DEFAULT_ALPHA, a)):
        these = [r for r in rows if row_alpha(r) == alpha]
        planned = alpha in alphas
        at_alpha = sorted((set(fractions) if planned else set()) | {r["fraction"] for r in these})
        defenses = [s for s in strategies if (planned and s in planned_strategies)
                    or any(r["strategy"] == s for r in these)]
        attacked = [a for a in attacks if (planned and a in planned_attacks)
                    or any(r["attack"] == a and r["strategy"] != ORACLE for r in these)]
        header = (f"## {base.dataset}, {args.clients} clients, {base.partitioning} (alpha={alpha}), "
                  f"{base.num_server_rounds} rounds")
        lines += table_lines(these, defenses, attacked, at_alpha, header, alpha_title(alpha))
    (output / "tables.md").write_text("\n".join(lines))


def _resummarised(output: Path, row: dict, num_clients: int) -> dict:
    """A finished row written by an older runner, summarised again from its results file.

    Such a row lacks the newer columns, and a table that read it as "no figure" would take a
    defense's worst case over its other attacks alone.
    """
    cell = _row_cell(row)
    result = finished_cell(output, cell) if cell is not None else None
    if result is None:
        return row
    return {**row, **summarise_cell(cell, result, num_clients, "finished", row.get("seconds"))}


def recorded_cells(output: Path) -> list[Cell]:
    """The finished cells of ``output``'s cells.json (those earlier grids on it put in its tables)."""
    try:
        rows = json.loads((output / "cells.json").read_text())
    except (OSError, ValueError):  # unreadable, not JSON, not text: the tables are written afresh
        return []
    if not isinstance(rows, list):
        return []
    return [cell for row in rows if isinstance(row, dict) and row.get("status") == "finished"
            and (cell := _row_cell(row)) is not None and 0 < cell.fraction < 1]


def _row_cell(row: dict) -> Cell | None:
    """The cell a cells.json row describes; None for a row without those columns, of other types, or another key.

    The tables sort and compare the columns as they stand in the row, so a fraction written
    as text (hand-edited) is no cell either.
    """
    try:
        fields = (row["strategy"], row["attack"], row["fraction"], row["seed"])
        cell = Cell(*fields, row_alpha(row))
    except (KeyError, TypeError, ValueError):
        return None
    typed = (isinstance(fields[0], str) and isinstance(fields[1], str)
             and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in fields[2:])
             and isinstance(fields[3], int))
    return cell if typed and cell.key == row.get("key") else None


def _still_there(output: Path, row: dict) -> bool:
    """Whether a cells.json row still describes something on disk.

    A finished cell must still be finished, a failed one still have its directory: deleting
    a cell's directory (to run it again, or to drop a seed) takes its row with it.
    """
    if row.get("status") == "finished":
        return _still_finished(output, row)
    if row.get("status") == "failed":
        return (output / "cells" / str(row.get("key"))).is_dir()
    return True


def _still_finished(output: Path, row: dict) -> bool:
    cell = _row_cell(row)
    return cell is not None and finished_cell(output, cell) is not None


def _union(first: list[str], more) -> list[str]:
    ordered = list(first)
    for item in more:
        if item not in ordered:
            ordered.append(item)
    return ordered


if __name__ == "__main__":
    sys.exit(main())
