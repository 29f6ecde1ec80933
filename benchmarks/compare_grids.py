"""Compare two grids cell by cell: a variant setting against the grid it departs from.

    .venv/bin/python benchmarks/compare_grids.py --base benchmarks/fmnist-grid \\
        --variant benchmarks/fmnist-grid-warm-step-auto

A variant grid reruns some cells of a base grid with one setting changed (``--set KEY=VALUE``
on ``softmerge-grid``). Its own tables show the variant alone; this one shows what the
change did. For every finished cell of the variant whose key the base has finished too, it
prints the oracle (from either grid), both grids' final round and mean of the last 10
rounds, the difference, the backdoor's success where the attack has a trigger, and the
rounds SoftMerge scored at the merge step (``softmerge-warm-step``), and where the merged
weight went in each grid: the mean share on malicious candidates, and the mean share of the
honest clients the merge opened (so a difference shows whether attackers got in or honest
clients were let in or shut out). Then, per Dirichlet α
and malicious fraction, the mean difference and each grid's worst case over the attacks
compared (per attack the mean over its paired seeds that have an oracle, with the seed
counts when attacks have different numbers of them), with how many attacks are within a
point of the oracle. First it lists the run-config keys on which the paired cells differ,
either way round (a cell that never recorded a key ran with its legacy value where the
grid knows it; keys recorded on one side only are listed apart), so that a variant which
differs in more than the setting it is about shows it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from softmerge.simulations.grid import (FRACTION_KEYS, LEGACY_VALUES, NO_ATTACK, ORACLE, Cell, finished_cell,
                                         format_percent, fraction_free, malicious_ids, recorded_cells,
                                         settings_mismatch, summarise_cell, within_a_point)

STATISTICS = (("final_accuracy", "final"), ("last10_accuracy", "last 10"))


def merge_step_rounds(result: dict) -> dict[str, int] | None:
    """How many trained rounds were scored at the merge step, and of those how many were learned again.

    ``merge_step``: the rounds scored at the merge step; ``own_step_retry``: those learned
    again from the own step (``GateReport.own_step_retry``); ``open_share``: those scored
    again at the share of the clients their first merge opened (``GateReport.open_share``).
    None if no round records the merge step.
    """
    reports = [entry["gates"] for entry in result.get("rounds", [])[1:] if isinstance(entry.get("gates"), dict)]
    if not any(report.get("merge_step") is not None for report in reports):
        return None
    return {"merge_step": sum(bool(report.get("merge_step")) for report in reports),
            "own_step_retry": sum(bool(report.get("own_step_retry")) for report in reports),
            "open_share": sum(report.get("open_share") is not None for report in reports)}


def honest_open_share(result: dict, cell: Cell, clients: int) -> float | None:
    """The mean over trained rounds of the share of honest clients the merge gave any weight.

    An honest client whose reply was excluded before gating, or that was not sampled,
    counts as shut for that round. None if no round records its gates.
    """
    malicious = set(malicious_ids(clients, cell.fraction)) if cell.attack != NO_ATTACK else set()
    honest = {f"client-{i}" for i in range(clients) if i not in malicious}
    shares = []
    for entry in result.get("rounds", [])[1:]:
        gates = entry.get("gates")
        if not (isinstance(gates, dict) and gates.get("units") and gates.get("weights")):
            continue
        opened = {label for k, label in enumerate(gates["candidates"])
                  if label in honest and any(row[k] > 0 for row in gates["weights"])}
        shares.append(len(opened) / len(honest))
    return statistics.fmean(shares) if shares and honest else None


def oracle_of(cell: Cell, grids: list[Path], clients: int) -> dict | None:
    """The oracle's summary in ``cell``'s setting, from the first grid that has it finished."""
    twin = Cell(ORACLE, NO_ATTACK, cell.fraction, cell.seed, cell.alpha)
    for grid in grids:
        result = finished_cell(grid, twin)
        if result is not None:
            return summarise_cell(twin, result, clients, "finished", None)
    return None


def paired_cells(base: Path, variant: Path, clients: int, strategies: set[str] | None = None) -> list[dict]:
    """One record per cell finished in both grids, in the variant's order."""
    pairs = []
    for cell in recorded_cells(variant):
        if cell.strategy == ORACLE or (strategies and cell.strategy not in strategies):
            continue
        after, before = finished_cell(variant, cell), finished_cell(base, cell)
        if after is None or before is None:
            continue
        pairs.append({"cell": cell,
                      "base": summarise_cell(cell, before, clients, "finished", None),
                      "variant": summarise_cell(cell, after, clients, "finished", None),
                      "base_merge_steps": merge_step_rounds(before),
                      "variant_merge_steps": merge_step_rounds(after),
                      "base_honest_open": honest_open_share(before, cell, clients),
                      "variant_honest_open": honest_open_share(after, cell, clients),
                      "settings": settings_difference(before.get("settings") or {}, after.get("settings") or {},
                                                      cell),
                      "oracle": oracle_of(cell, [base, variant], clients)})
    return pairs


ONE_SIDE = "(not recorded)"


def settings_difference(before: dict, after: dict, cell: Cell) -> dict[str, tuple]:
    """``{key: (base's, variant's)}`` for every run-config key the two cells ran with differently.

    :func:`settings_mismatch` reads the keys of its second argument only, so it is asked
    both ways. A key neither the cell's record nor the grid's legacy values account for on
    one side is listed with ``ONE_SIDE`` there: what that cell ran with is not known.
    """
    # A no-attack cell of a rule blind to the fraction may be another fraction's run, reused.
    ignored = FRACTION_KEYS if fraction_free(cell) else frozenset()
    found = settings_mismatch(before, after, ignored)
    found.update({key: (b, a) for key, (a, b) in settings_mismatch(after, before, ignored).items()})
    for key in set(before) ^ set(after):
        compared = settings_mismatch({key: ONE_SIDE}, {"strategy": cell.strategy, key: 0})
        if key in found or key in LEGACY_VALUES or key in ignored or not compared:
            continue  # already there, known, fraction-only, or not a key the grid compares (where a cell ran)
        found[key] = (before.get(key, ONE_SIDE), after.get(key, ONE_SIDE))
    return found


def _points(value: float | None) -> str:
    """A difference in points, rounded as the accuracies are (half up, away from zero here)."""
    if value is None:
        return "-"
    text = format_percent(abs(value))
    return text if text.strip("0.") == "" else ("+" if value > 0 else "-") + text


def _pair_text(row: dict) -> str:
    text = " / ".join(format_percent(row[field]) for field, _ in STATISTICS)
    return text + (f" ({format_percent(row['final_backdoor_asr'])}%)" if row.get("final_backdoor_asr") is not None
                   else "")


def _difference(pair: dict, field: str) -> float | None:
    before, after = pair["base"][field], pair["variant"][field]
    return None if before is None or after is None else after - before


def _steps(counts: dict[str, int] | None) -> str:
    """The merge-step rounds, with the retried and the rescored among them when there are any."""
    if counts is None:
        return "-"
    notes = [f"{counts[key]} {name}" for key, name in (("own_step_retry", "own-step retry"),
                                                       ("open_share", "at the open share")) if counts.get(key)]
    return str(counts["merge_step"]) + (f" ({', '.join(notes)})" if notes else "")


def _shares(pair: dict) -> str:
    """Malicious weight and honest clients opened, base / variant.

    With no attack every client is honest; the clients the grid would make malicious at this
    fraction are not, so no malicious weight is shown.
    """
    weights = "-" if pair["cell"].attack == NO_ATTACK else " / ".join(
        format_percent(pair[side].get("malicious_weight")) for side in ("base", "variant"))
    opened = " / ".join(format_percent(pair.get(f"{side}_honest_open"), digits=0) for side in ("base", "variant"))
    return f"{weights} | {opened}"


def comparison(pairs: list[dict]) -> list[str]:
    if not pairs:
        return ["No cell is finished in both grids."]
    changed: dict[str, set] = defaultdict(set)
    unknown: dict[str, set] = defaultdict(set)
    for pair in pairs:
        for key, (before, after) in pair["settings"].items():
            if ONE_SIDE in (before, after):
                unknown[key].add("base" if after == ONE_SIDE else "variant")
            else:
                changed[key].add((repr(before), repr(after)))
    lines = ["Settings that differ between the paired cells (base -> variant): " + (
        "; ".join(f"`{key}` {', '.join(f'{b} -> {a}' for b, a in sorted(values))}"
                  for key, values in sorted(changed.items())) if changed else "none") + "."]
    if unknown:
        lines.append("Recorded by one grid's cells only (what the others ran with is not recorded): " + "; ".join(
            f"`{key}` ({' and '.join(sorted(sides))})" for key, sides in sorted(unknown.items())) + ".")
    lines.append("")
    groups: dict[tuple[float, float], list[dict]] = defaultdict(list)
    for pair in pairs:
        groups[(pair["cell"].alpha, pair["cell"].fraction)].append(pair)
    for (alpha, fraction), group in sorted(groups.items()):
        lines += [f"### α = {alpha:g}, {fraction:.0%} malicious", "",
                  "| defense | attack | seed | oracle | base | variant | Δ final | Δ last 10 "
                  "| merge-step rounds, base / variant | malicious weight %, base / variant "
                  "| honest clients opened %, base / variant |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for pair in sorted(group, key=lambda p: (p["cell"].strategy, p["cell"].attack != NO_ATTACK,
                                                 p["cell"].attack, p["cell"].seed)):
            cell, oracle = pair["cell"], pair["oracle"]
            lines.append(f"| {cell.strategy} | {cell.attack} | {cell.seed} | "
                         f"{_pair_text(oracle) if oracle else '-'} | {_pair_text(pair['base'])} | "
                         f"{_pair_text(pair['variant'])} | {_points(_difference(pair, 'final_accuracy'))} | "
                         f"{_points(_difference(pair, 'last10_accuracy'))} | "
                         f"{_steps(pair['base_merge_steps'])} / {_steps(pair['variant_merge_steps'])} | "
                         f"{_shares(pair)} |")
        lines += ["", *summary(group), ""]
    return lines


def summary(group: list[dict]) -> list[str]:
    """Per defense: the mean difference, and each grid's worst case over the attacks with its oracle count."""
    lines = ["| defense | cells | mean Δ final | mean Δ last 10 | worst case, base | worst case, variant |",
             "|---|---|---|---|---|---|"]
    for strategy in sorted({pair["cell"].strategy for pair in group}):
        own = [pair for pair in group if pair["cell"].strategy == strategy]
        means = []
        for field, _ in STATISTICS:
            values = [d for pair in own if (d := _difference(pair, field)) is not None]
            means.append(_points(statistics.fmean(values)) if values else "-")
        worst = [_worst_case(own, side) for side in ("base", "variant")]
        lines.append(f"| {strategy} | {len(own)} | {means[0]} | {means[1]} | {worst[0]} | {worst[1]} |")
    return lines


def _worst_case(pairs: list[dict], side: str) -> str:
    """The worst attack's seed mean, per statistic, and how many attacks are within a point of the oracle.

    Per attack the mean is over its paired seeds that have an oracle (a pair without one is
    left out, so both grids are held to the same yardstick); when the attacks have different
    numbers of such seeds, the range is given, as the grid's own summary marks it. No attack
    other than none: no worst case.
    """
    by_attack: dict[str, list[dict]] = defaultdict(list)
    for pair in pairs:
        if pair["cell"].attack != NO_ATTACK and pair["oracle"] is not None:
            by_attack[pair["cell"].attack].append(pair)
    if not by_attack:
        return "-"
    parts = []
    for field, label in STATISTICS:
        means, close, seeds = [], 0, set()
        for attack_pairs in by_attack.values():
            present = [pair for pair in attack_pairs if pair[side][field] is not None
                       and pair["oracle"][field] is not None]
            if not present:
                continue
            mean = statistics.fmean(pair[side][field] for pair in present)
            means.append(mean)
            seeds.add(len(present))
            close += within_a_point(mean, statistics.fmean(pair["oracle"][field] for pair in present))
        if means:
            counts = f" [{min(seeds)}-{max(seeds)} seeds]" if len(seeds) > 1 else ""
            parts.append(f"{label} {format_percent(min(means))} ({close}/{len(means)}){counts}")
    return ", ".join(parts) if parts else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="benchmarks/fmnist-grid", help="the grid the variant departs from")
    parser.add_argument("--variant", required=True, help="the grid of cells rerun with a changed setting")
    parser.add_argument("--strategies", default="", help="comma-separated; default: every defense in the variant")
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args(argv)
    base, variant = Path(args.base), Path(args.variant)
    for grid in (base, variant):
        if not (grid / "cells.json").is_file():
            print(f"compare_grids: {grid} has no cells.json (run the grid, or its --tables-only, on it)",
                  file=sys.stderr)
            return 2
    strategies = {item.strip() for item in args.strategies.split(",") if item.strip()} or None
    print("\n".join(comparison(paired_cells(base, variant, args.clients, strategies))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
