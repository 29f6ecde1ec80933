"""Does ``torch.compile`` pay for the gate step of the default simulation's merge?

A gate step on the digits MLP (6,570 parameters) is almost all fixed per-op cost: about
1 ms, against a few microseconds of arithmetic (docs/performance-notes.md, session 28).
This times the step's differentiable part (mix the K candidates with the sampled gates'
weights, run the model through ``functional_call``, cross-entropy, backward to log α) in
eager mode and compiled by inductor, on the same random draws, and reports the compile's
first-call cost next to the median step.

    python benchmarks/compiled_step.py [--candidates 11] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call

from softmerge.aggregation.gates import sample_gates
from softmerge.simulations.tasks import DigitsMLP

GATE_EXAMPLES = 300
BATCH = 128


def build(candidates: int):
    model = DigitsMLP()
    reference = {name: p.detach() for name, p in model.named_parameters()}
    names = list(reference)
    sizes = [reference[n].numel() for n in names]
    shapes = [reference[n].shape for n in names]
    stacked = torch.stack([torch.cat([(reference[n] + 0.01 * torch.randn_like(reference[n])).reshape(-1)
                                      for n in names]) for _ in range(candidates)])
    inputs, targets = torch.randn(GATE_EXAMPLES, 64), torch.randint(0, 10, (GATE_EXAMPLES,))

    def gate_loss(weights: torch.Tensor, batch_inputs: torch.Tensor, batch_targets: torch.Tensor) -> torch.Tensor:
        flat = weights[0] @ stacked
        merged = {n: piece.view(shape) for n, piece, shape in zip(names, flat.split(sizes), shapes)}
        logits = functional_call(model, merged, (batch_inputs,), tie_weights=False)
        return nn.functional.cross_entropy(logits, batch_targets)

    return gate_loss, inputs, targets


def time_steps(loss_fn, inputs, targets, candidates: int, steps: int) -> tuple[float, list[float]]:
    log_alpha = torch.zeros(1, candidates, requires_grad=True)
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        started = time.perf_counter()
        batch = torch.randperm(GATE_EXAMPLES, generator=generator)[:BATCH]
        gates = sample_gates(log_alpha, generator)
        weights = gates / gates.sum(-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
        log_alpha.grad = None
        loss_fn(weights, inputs[batch], targets[batch]).backward()
        return time.perf_counter() - started

    first = step()
    return first, [step() for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=11, help="K: ten clients and the keep model")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gate_loss, inputs, targets = build(args.candidates)
    for label, loss_fn in (("eager", gate_loss), ("compiled", torch.compile(gate_loss, dynamic=False))):
        first, times = time_steps(loss_fn, inputs, targets, args.candidates, args.steps)
        print(f"{label:9s} first call {first:7.2f} s   median step {statistics.median(times) * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
