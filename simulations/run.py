"""softmerge-run: one federated experiment through Flower's simulation engine.

Every run-config key can be set with ``--set KEY=VALUE``. With an ``output-dir`` the run
checkpoints every round, and the same command after an interruption resumes where it
stopped. Exits non-zero if the run fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, check_simulation, dataset_problem, parse_run_config, parse_set_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="softmerge-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        settings = parse_run_config(parse_set_options(args.set))
        check_simulation(settings, args.clients)
    except ConfigError as error:
        print(f"softmerge-run: configuration error: {error}", file=sys.stderr)
        return 2
    if problem := dataset_problem(settings, args.clients):
        print(f"softmerge-run: dataset error: {problem}", file=sys.stderr)
        return 2

    from ..server.results import load_results
    from .engine import run_experiment

    log_file = Path(settings.output_dir) / "flower.log" if settings.output_dir else None
    try:
        run_experiment(settings, args.clients, log_file=log_file)
    except Exception as error:  # noqa: BLE001  (reported; the exit code says so)
        print(f"softmerge-run: the run failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if settings.output_dir:
        result = load_results(settings.output_dir)
        final = result["rounds"][-1]
        print(f"softmerge-run: {result['status']} after round {final['round']}, "
              f"test accuracy {final['test_accuracy']:.4f}")
        return 0 if result["status"] == "finished" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
