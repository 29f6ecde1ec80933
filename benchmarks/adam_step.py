"""Does the merge's one-tensor Adam (``aggregation.merge._Adam``) earn its place over torch.optim.Adam?

Both optimisers take the same 70 steps (a typical round's gate learning) on a log_alpha of
shape (units, candidates), from the same start and gradients. The script prints the median
wall time of the 70 steps for each, and whether the two end at bit-identical parameters.

    python benchmarks/adam_step.py
"""

from __future__ import annotations

import statistics
import time

import torch

from softmerge.aggregation.merge import _Adam

STEPS, REPEATS = 70, 50
# (units, candidates): the digits MLP with 10 clients, the grid's CNN with 20, a CNN with 100.
SHAPES = ((3, 11), (4, 21), (4, 101))


def time_steps(make_optimizer, shape):
    times, final = [], None
    for _ in range(REPEATS):
        generator = torch.Generator().manual_seed(0)
        log_alpha = torch.nn.Parameter(torch.randn(shape, generator=generator))
        optimizer = make_optimizer(log_alpha)
        gradients = [torch.randn(shape, generator=generator) for _ in range(STEPS)]
        started = time.perf_counter()
        for gradient in gradients:
            log_alpha.grad = gradient
            optimizer.step()
        times.append(time.perf_counter() - started)
        final = log_alpha.detach().clone()
    return statistics.median(times), final


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'shape':>10}  {'_Adam ms':>9}  {'torch Adam ms':>13}  ratio  identical")
    for shape in SHAPES:
        ours, ours_final = time_steps(lambda p: _Adam(p, 0.1), shape)
        theirs, theirs_final = time_steps(lambda p: torch.optim.Adam([p], lr=0.1), shape)
        print(f"{str(shape):>10}  {ours * 1e3:9.2f}  {theirs * 1e3:13.2f}  {theirs / ours:5.1f}  "
              f"{torch.equal(ours_final, theirs_final)}")


if __name__ == "__main__":
    main()
