"""What grouping near-identical replies adds to a soft merge, on the main job's setting.

The digits task, 10 clients after one local epoch from the initial model, 3 of them sending
extreme values (update x1e3, x1e6, x1e30) as in the main job; one soft merge with the
defaults against one with ``near_duplicate_tolerance=0.1``, with and without gate steps,
alternating, median of ``--repeats`` calls each, 1 torch thread:

    python benchmarks/near_duplicate_cost.py --repeats 9
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from softmerge.aggregation import SoftMergeConfig, soft_merge
from softmerge.client.attacks import poison_state
from softmerge.simulations.config import RunSettings
from softmerge.simulations.tasks import ArraySet, build_model, load_partition, load_task, train_model


def main_job_candidates(clients: int = 10):
    """The initial digits model, its gate split, and the clients' first-round replies."""
    task = load_task("digits", 200, 360, 0, "")
    model = build_model("digits", seed=0)
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    extreme_factors = RunSettings().extreme_factors  # the main job's attackers
    candidates = []
    for partition in range(clients):
        data = load_partition("digits", partition, clients, seed=0)
        local = build_model("digits")
        local.load_state_dict(start)
        train_model(local, ArraySet(data.x, data.y), epochs=1, learning_rate=0.05, batch_size=32, seed=partition)
        state = {name: tensor.detach().clone() for name, tensor in local.state_dict().items()}
        if partition < len(extreme_factors):
            state = poison_state("extreme", start, state, scale=extreme_factors[partition])
        candidates.append(state)
    return model, task.gate.tensors(), candidates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, gate, candidates = main_job_candidates()
    base = SoftMergeConfig()
    variants = {"default": base, "near-duplicates 0.1": dataclasses.replace(base, near_duplicate_tolerance=0.1)}
    seconds: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, config in variants.items():
            for steps_label, variant in (("", config), (", steps=0", dataclasses.replace(config, steps=0))):
                started = time.perf_counter()
                soft_merge(model, candidates, gate, variant)
                seconds.setdefault(name + steps_label, []).append(time.perf_counter() - started)
    for name, values in seconds.items():
        print(f"{name}: median {statistics.median(values) * 1000:.2f} ms over {len(values)} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
