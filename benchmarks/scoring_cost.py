"""Seconds of the soft merge's scoring passes (own loss, mirror) against a saved implementation.

Before its first gate step the soft merge runs every candidate forward over the gate split
(its own loss, for the warm start) and, with the mirror test, its mirror image too. This
script times ``soft_merge`` on the same K SmallCNN candidates, some of them identical copies
of one reply as IPM, ALIE, min-max and min-sum send, under two configurations (the current
default and the plain warm start), for the merge in this checkout and for a saved
``merge.py`` (``--before``), alternating the two in one process. ``steps=0`` isolates the
scoring passes; ``steps=50`` (no early stop) adds a fixed number of gate steps.

    git show e94638c:aggregation/merge.py > /tmp/merge_before.py
    python benchmarks/scoring_cost.py --before /tmp/merge_before.py --distinct 12 --copies 8

Candidates are the model's initial weights plus Gaussian noise; the timing does not depend
on what they are. Prints a markdown table of median seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from performance import _load_merge  # noqa: E402

from softmerge.aggregation import merge as current  # noqa: E402
from softmerge.simulations.tasks import build_model  # noqa: E402

CONFIGS = {
    "default (mirror significance test, ceiling)": dict(mirror_test=True, warm_start_ceiling=True,
                                                        mirror_confidence=2.0),
    "own-loss warm start only": dict(mirror_test=False, warm_start_ceiling=False, mirror_confidence=0.0),
}


def candidates(model: torch.nn.Module, distinct: int, copies: int, seed: int) -> list[dict[str, torch.Tensor]]:
    base = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)

    def noisy() -> dict[str, torch.Tensor]:
        return {name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator) for name, tensor in base.items()}

    crafted = noisy()
    return [noisy() for _ in range(distinct)] + [{k: v.clone() for k, v in crafted.items()} for _ in range(copies)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a saved aggregation/merge.py to compare with")
    parser.add_argument("--distinct", type=int, default=12, help="candidates with weights of their own")
    parser.add_argument("--copies", type=int, default=8, help="identical copies of one more reply")
    parser.add_argument("--gate-size", type=int, default=300)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)

    implementations = {"this checkout": current, "before": _load_merge(args.before)}
    model = build_model("fashion-mnist", 0)
    pool = candidates(model, args.distinct, args.copies, seed=0)
    generator = torch.Generator().manual_seed(1)
    gate = (torch.randn(args.gate_size, 1, 28, 28, generator=generator),
            torch.randint(0, 10, (args.gate_size,), generator=generator))

    print(f"SmallCNN, K = {len(pool)} ({args.distinct} distinct, {args.copies} identical), "
          f"{args.gate_size} gate images, median of {args.reps}, torch threads {torch.get_num_threads()}")
    print()
    print("| configuration | gate steps | this checkout (s) | before (s) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, overrides in CONFIGS.items():
        for steps in (0, 50):
            seconds = {label: [] for label in implementations}
            for _ in range(args.reps):
                for label, module in implementations.items():
                    config = module.SoftMergeConfig(steps=steps, tolerance=0.0, **overrides)
                    seconds[label].append(module.soft_merge(model, pool, gate, config)[1].seconds)
            after, before = (statistics.median(seconds[label]) for label in implementations)
            print(f"| {name} | {steps} | {after:.3f} | {before:.3f} | {after / before:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
