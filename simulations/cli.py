"""softmerge-sim: the offline poisoning simulation (the project's main job).

On the same seeds it runs three experiments through Flower's simulation engine:

1. FedAvg with no attack (the clean reference),
2. FedAvg under the attack,
3. SoftMerge under the attack,

then prints per-round test accuracy side by side and SoftMerge's final gate table
(client x merge unit; one unit, the whole model, by default), and writes results, a CSV
and a plot to the output directory. It exits non-zero if any run fails or ends without all
its rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .config import ConfigError, RunSettings, check_simulation, parse_run_config, parse_set_options

RUNS = (
    ("fedavg-clean", "fedavg", False),
    ("fedavg-attack", "fedavg", True),
    ("softmerge-attack", "softmerge", True),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softmerge-sim",
        description="Offline poisoning simulation: FedAvg (clean), FedAvg (attacked) and SoftMerge (attacked).",
    )
    parser.add_argument("--rounds", type=int, default=10, help="server rounds (default 10)")
    parser.add_argument("--clients", type=int, default=10, help="simulated clients (default 10)")
    parser.add_argument("--malicious", default="7,8,9", help="malicious partition ids (default 7,8,9)")
    parser.add_argument("--attack", default="extreme", help="client attack (default extreme)")
    parser.add_argument("--extreme-values", default="1e3,1e6,1e30",
                        help="factors for the extreme attack, one per malicious client in turn")
    parser.add_argument("--dataset", default="digits", help="digits (embedded) or fashion-mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="results/demo", help="output directory (default results/demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other run-config key, e.g. --set softmerge-mode=select (repeatable)")
    return parser


# softmerge-sim runs three runs of its own: these keys are its to set.
SIM_SET_KEYS = {
    "strategy": "softmerge-sim runs FedAvg and SoftMerge side by side; for one run of another strategy use "
                "softmerge-run --set strategy=...",
    "output-dir": "use --output (each run writes to a directory under it)",
    "exclude-malicious": "softmerge-sim compares clean FedAvg with both under attack; for the oracle (FedAvg over the "
                         "honest clients) use softmerge-run --set exclude-malicious=true",
}


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    config: dict[str, object] = {
        "num-server-rounds": args.rounds,
        "dataset": args.dataset,
        "seed": args.seed,
        "attack": args.attack,
        "malicious-partitions": args.malicious,
        "extreme-values": args.extreme_values,
    }
    config.update(parse_set_options(args.set, reserved=SIM_SET_KEYS))
    settings = parse_run_config(config)
    check_simulation(settings, args.clients)
    return settings


def format_accuracy_table(runs: dict[str, dict]) -> str:
    names = list(runs)
    rounds = max(len(r["rounds"]) for r in runs.values())
    lines = ["round  " + "  ".join(f"{name:>16}" for name in names)]
    for index in range(rounds):
        cells = []
        for name in names:
            entries = runs[name]["rounds"]
            accuracy = entries[index]["test_accuracy"] if index < len(entries) else None
            cells.append(f"{accuracy:16.3f}" if accuracy is not None else f"{'-':>16}")
        lines.append(f"{index:5d}  " + "  ".join(cells))
    return "\n".join(lines)


def plot_accuracy(runs: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, result in runs.items():
        rounds = [entry["round"] for entry in result["rounds"]]
        accuracy = [entry["test_accuracy"] for entry in result["rounds"]]
        axis.plot(rounds, accuracy, marker="o", label=name)
    axis.set_xlabel("round")
    axis.set_ylabel("test accuracy (server test split)")
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        base = settings_from_args(args)
    except ConfigError as error:
        print(f"softmerge-sim: configuration error: {error}", file=sys.stderr)
        return 2

    # Imported late so that --help and configuration errors answer at once.
    from ..server.results import load_results
    from .engine import run_experiment
    from .config import dataset_problem

    if problem := dataset_problem(base, args.clients):
        print(f"softmerge-sim: dataset error: {problem}", file=sys.stderr)
        return 2

    output = Path(args.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"softmerge-sim: cannot write to --output {output}: {error}", file=sys.stderr)
        return 2
    if base.resume and (refused := _checkpoint_problems(base, output, args.clients)):
        # Before any run starts (each takes a Flower start-up) or summary.json is rewritten.
        print("softmerge-sim: " + "; ".join(refused) + ". Give this job its own --output, or set resume=false.",
              file=sys.stderr)
        return 2
    print(f"softmerge-sim: {base.dataset}, {args.clients} clients, malicious {sorted(base.malicious_ids)} "
          f"({base.attack}: {base.extreme_values if base.attack == 'extreme' else ''}), "
          f"{base.num_server_rounds} rounds")
    results: dict[str, dict] = {}
    failures = []
    for name, strategy, attacked in RUNS:
        settings = _run_settings(base, output, strategy, attacked, name)
        started = time.perf_counter()
        try:
            run_experiment(settings, args.clients, log_file=output / f"{name}.log")
            result = load_results(settings.output_dir)
        except Exception as error:  # noqa: BLE001  (reported, and the exit code says so)
            failures.append(f"{name}: {type(error).__name__}: {error}")
            print(f"  {name:<17} FAILED: {error} (log: {output / (name + '.log')})", file=sys.stderr)
            continue
        if result.get("status") != "finished" or len(result["rounds"]) != base.num_server_rounds + 1:
            failures.append(f"{name}: ended with status {result.get('status')} after {len(result['rounds'])} rounds")
            continue
        results[name] = result
        final = result["rounds"][-1]["test_accuracy"]
        print(f"  {name:<17} done in {time.perf_counter() - started:5.1f}s, final accuracy {final:.3f}")

    if results:
        print("\nTest accuracy per round (server test split, never seen by the gates):")
        print(format_accuracy_table(results))
        plot_accuracy(results, output / "accuracy.png", f"{base.dataset}: {base.attack} attack on "
                      f"{len(base.malicious_ids)}/{args.clients} clients")
    soft = results.get("softmerge-attack")
    if soft:
        gates = soft["rounds"][-1].get("gates")
        if gates:
            from ..aggregation import Exclusion, GateReport

            fields = dict(gates)
            fields["excluded"] = [Exclusion(**e) for e in fields.get("excluded", [])]
            report = GateReport(**fields)
            malicious_labels = [f"client-{i}" for i in sorted(base.malicious_ids)]
            print(f"\nSoftMerge final mixing weights (candidate x merge unit), round {base.num_server_rounds}:")
            print(report.table())
            print(f"weight on malicious candidates: {report.weight_on(malicious_labels):.4f}")
    summary = {name: {"final_accuracy": r["rounds"][-1]["test_accuracy"],
                      "final_loss": r["rounds"][-1]["test_loss"]} for name, r in results.items()}
    (output / "summary.json").write_text(json.dumps({"runs": summary, "failures": failures}, indent=1))
    print(f"\nresults: {output}/<run>/results.json, rounds.csv; plot: {output / 'accuracy.png'}")
    if failures:
        print("softmerge-sim: failed runs:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _run_settings(base: RunSettings, output: Path, strategy: str, attacked: bool, name: str) -> RunSettings:
    return replace(base, strategy=strategy, attack=base.attack if attacked else "none", output_dir=str(output / name))


def _checkpoint_problems(base: RunSettings, output: Path, clients: int) -> list[str]:
    """Why a run's checkpoint under ``output`` cannot be resumed with these settings (another config or
    client count, damage)."""
    from ..server.checkpoint import CheckpointError, check_node_count, config_fingerprint, load_checkpoint
    from .config import to_run_config

    problems = []
    for name, strategy, attacked in RUNS:
        settings = _run_settings(base, output, strategy, attacked, name)
        try:
            run_config = to_run_config(settings)
            checkpoint = load_checkpoint(Path(settings.output_dir), config_fingerprint(run_config), run_config)
            if checkpoint is not None:
                check_node_count(checkpoint, clients, Path(settings.output_dir))
        except CheckpointError as error:
            problems.append(f"{name}: {error}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
