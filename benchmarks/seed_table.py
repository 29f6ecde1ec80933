"""Compare defenses over several seeds of a grid, on the seeds every one of them has finished.

The grid's own tables average each cell over whatever seeds it has, so while a seed is
still running, one defense's figure can be over three seeds and another's over one. This
table reads the cells on disk and, per attack, keeps only the seeds that the oracle and
every listed defense have finished ("complete seeds"), so each row compares like with like:

    .venv/bin/python benchmarks/seed_table.py --output benchmarks/fmnist-grid --fraction 0.4 \\
        --strategies softmerge,fltrust,centered-clipping --seeds 0,1,2

Prints markdown: per attack, the mean over the complete seeds (final round and mean of the
last 10 rounds) with the range across seeds, the oracle's, then each defense's worst case
over the attacks (no attack left out) and how many attacks are within 1 point of the oracle,
and, for the attacks with a trigger, the backdoor's success rate on the final round over the
same seeds (the accuracy target does not show a backdoor that gets in at little cost).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from softmerge.simulations.grid import (DEFAULT_ALPHA, NO_ATTACK, ORACLE, Cell, finished_cell, format_percent,
                                         row_alpha, summarise_cell, within_a_point)

STATISTICS = (("final_accuracy", "final"), ("last10_accuracy", "last 10"))


def figures(output: Path, strategy: str, attack: str, fraction: float, seeds: list[int],
            clients: int, alpha: float = DEFAULT_ALPHA) -> dict[int, dict]:
    """The finished seeds of one cell: seed -> its summary row."""
    found = {}
    for seed in seeds:
        cell = Cell(strategy, attack, fraction, seed, alpha)
        result = finished_cell(output, cell)
        if result is not None:
            found[seed] = summarise_cell(cell, result, clients, "finished", result.get("seconds"))
    return found


def attacks_in_grid(output: Path, fraction: float, alpha: float = DEFAULT_ALPHA) -> list[str]:
    """The attacks the grid has a (non-oracle) cell of at ``fraction`` and ``alpha``, no attack first.

    In the order of the grid's ``cells.json``, which is the order its own tables use; a
    fixed list here went stale when an attack was added to the grid.
    """
    try:
        rows = json.loads((output / "cells.json").read_text())
        found = [row["attack"] for row in rows
                 if row["strategy"] != ORACLE and math.isclose(float(row["fraction"]), fraction)
                 and row_alpha(row) == alpha]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise SystemExit(f"seed_table: cannot list the attacks from {output / 'cells.json'} ({error}); "
                         "pass --attacks") from error
    attacks = list(dict.fromkeys(found))
    return sorted(attacks, key=lambda attack: attack != NO_ATTACK)


def _text(values: list[float]) -> str:
    # Rounded as the grid's tables round (half up on the exact decimal).
    return format_percent(statistics.fmean(values)) + (
        f" (±{format_percent(max(values) - min(values))})" if len(values) > 1 else "")


def seed_table(output: Path, fraction: float, strategies: list[str], attacks: list[str], seeds: list[int],
               clients: int, alpha: float = DEFAULT_ALPHA) -> list[str]:
    oracle = figures(output, ORACLE, NO_ATTACK, fraction, seeds, clients, alpha)
    header = " | ".join(f"{name} {label}" for name in [ORACLE, *strategies] for _, label in STATISTICS)
    lines = [f"| attack | complete seeds | {header} |", "|---|---|" + "---|" * (2 * (1 + len(strategies)))]
    worst: dict[str, dict[str, list[float]]] = {s: {field: [] for field, _ in STATISTICS} for s in strategies}
    close: dict[str, dict[str, int]] = {s: {field: 0 for field, _ in STATISTICS} for s in strategies}
    complete_attacks = 0
    backdoor_lines = []
    for attack in attacks:
        rows = {s: figures(output, s, attack, fraction, seeds, clients, alpha) for s in strategies}
        complete = [seed for seed in seeds if seed in oracle and all(seed in rows[s] for s in strategies)]
        if not complete:
            lines.append(f"| {attack} | none | " + " | ".join("-" for _ in range(2 * (1 + len(strategies)))) + " |")
            continue
        complete_attacks += attack != NO_ATTACK
        cells = []
        for name, source in [(ORACLE, oracle), *((s, rows[s]) for s in strategies)]:
            for field, _ in STATISTICS:
                values = [source[seed][field] for seed in complete]
                if any(v is None for v in values):
                    cells.append("-")
                    continue
                cells.append(_text(values))
                if name != ORACLE and attack != NO_ATTACK:
                    mean = statistics.fmean(values)
                    worst[name][field].append(mean)
                    reference = statistics.fmean(oracle[seed][field] for seed in complete)
                    close[name][field] += within_a_point(mean, reference)
        lines.append(f"| {attack} | {','.join(map(str, complete))} | " + " | ".join(cells) + " |")
        success = [[rows[s][seed]["final_backdoor_asr"] for seed in complete] for s in strategies]
        if any(value is not None for values in success for value in values):
            backdoor_lines.append(f"| {attack} | {','.join(map(str, complete))} | " + " | ".join(
                "-" if any(v is None for v in values) else _text(values) for values in success) + " |")
    attacked = sum(attack != NO_ATTACK for attack in attacks)
    # An attack without a complete seed is not in the worst case: say so rather than let it look whole.
    partial = (f"; partial: {attacked - complete_attacks} of the {attacked} attacks have no complete seed"
               if complete_attacks < attacked else "")
    lines += ["", f"| defense | worst case, {' | worst case, '.join(label for _, label in STATISTICS)} |",
              "|---|" + "---|" * len(STATISTICS)]
    for strategy in strategies:
        lines.append(f"| {strategy} | " + " | ".join(
            f"{format_percent(min(worst[strategy][field]))} ({close[strategy][field]}/{complete_attacks} "
            f"within oracle - 1{partial})"
            if worst[strategy][field] else "-" for field, _ in STATISTICS) + " |")
    if backdoor_lines:
        lines += ["", "Backdoor success rate (%), final round, lower is better:", "",
                  "| attack | complete seeds | " + " | ".join(strategies) + " |",
                  "|---|---|" + "---|" * len(strategies), *backdoor_lines]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmarks/fmnist-grid", help="the grid's directory")
    parser.add_argument("--fraction", type=float, default=0.4)
    parser.add_argument("--strategies", default="softmerge,fltrust,centered-clipping")
    parser.add_argument("--attacks", default="",
                        help="comma-separated; default: every attack the grid has a cell of at this fraction")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="the cells' Dirichlet alpha")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if not (output / "cells").is_dir():
        print(f"seed_table: no grid cells in {output}", file=sys.stderr)
        return 2
    split = lambda text: [item.strip() for item in text.split(",") if item.strip()]  # noqa: E731
    attacks = split(args.attacks)
    try:
        known = attacks_in_grid(output, args.fraction, args.alpha)
    except SystemExit:
        if not attacks:
            raise
        known = attacks  # no readable cells.json to check the given names against
    attacks = attacks or known
    unknown = [attack for attack in attacks if attack not in known]
    if unknown:
        print(f"seed_table: the grid has no cell of {', '.join(unknown)} at {args.fraction:.0%} "
              f"(it has {', '.join(known)})", file=sys.stderr)
        return 2
    print("\n".join(seed_table(output, args.fraction, split(args.strategies), attacks,
                               [int(s) for s in split(args.seeds)], args.clients, args.alpha)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
