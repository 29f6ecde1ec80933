"""Every client's bend, round by round, on the default's trajectory: which quantile tells alpha apart?

`softmerge-warm-step = auto` compares one quantile of the clients' bends (the mean rise of the
gate-split loss under an update and its mirror image, `update_bend`) with a threshold. This runs the
reference setting (Fashion-MNIST, 20 clients) with `auto` and an unreachable threshold, so every
round scores at the candidate's own step as the default does, and records each client's bend.

    python benchmarks/bend_quantiles.py --alpha 0.1 --seed 0 --rounds 12 --output /tmp/bends-a0.1-s0.json

It prints the 15%, 25%, 50% and 75% quantiles per round (docs/configuration.md,
"softmerge-warm-bend-quantile", reads them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import softmerge.aggregation.merge as merge_module
import softmerge.server.strategy as strategy_module
from replica import CLIENTS, DATASET, GATE_SIZE, LOCAL_BATCH, LOCAL_LR, POOL, TEST_SIZE
from softmerge.simulations.config import parse_run_config
from softmerge.simulations.engine import run_experiment
from softmerge.simulations.grid import Cell, cell_settings

QUANTILES = (0.15, 0.25, 0.5, 0.75)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--attack", default="none")
    parser.add_argument("--fraction", type=float, default=0.4, help="malicious fraction (idle under --attack none)")
    parser.add_argument("--output", type=Path, required=True, help="JSON: per round, the labels and their bends")
    args = parser.parse_args()

    rounds: list[dict] = []
    current: dict = {}
    measure, merge = merge_module.update_bend, strategy_module.soft_merge

    def recorded_bend(own, reflected, keep_loss):
        # Called once per client group, in the order of the merge's candidates.
        value = measure(own, reflected, keep_loss)
        current["bends"].append(value)
        return value

    def recorded_merge(model, states, validation, config, **kwargs):
        current.clear()
        current.update(labels=list(kwargs.get("labels") or []), bends=[])
        result = merge(model, states, validation, config, **kwargs)
        rounds.append(dict(current))
        return result

    merge_module.update_bend, strategy_module.soft_merge = recorded_bend, recorded_merge
    base = parse_run_config({
        "dataset": DATASET, "num-server-rounds": args.rounds, "partitioning": "dirichlet",
        "dirichlet-alpha": args.alpha, "client-pool-size": POOL, "local-epochs": 1, "batch-size": LOCAL_BATCH,
        "learning-rate": LOCAL_LR, "server-gate-size": GATE_SIZE, "server-test-size": TEST_SIZE,
        "softmerge-warm-step": "auto", "softmerge-warm-bend": 1e9})
    with tempfile.TemporaryDirectory() as directory:
        settings = cell_settings(base, Cell("softmerge", args.attack, args.fraction, args.seed, args.alpha), CLIENTS,
                                 Path(directory))
        run_experiment(settings, CLIENTS, log_file=Path(directory) / "flower.log")
    args.output.write_text(json.dumps(rounds))
    print("round  " + "  ".join(f"q{q:.2f}" for q in QUANTILES))
    for number, record in enumerate(rounds, start=1):
        finite = [value for value in record["bends"] if np.isfinite(value)]
        print(f"{number:5d}  " + "  ".join(f"{np.quantile(finite, q):5.2f}" for q in QUANTILES))


if __name__ == "__main__":
    main()
