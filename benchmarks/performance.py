"""Speed and memory of SoftMerge against Flower's aggregators and FLTrust; writes docs/performance.md.

    git show 2626f1d:aggregation/merge.py > /tmp/merge_before.py   # the soft merge before issue 5
    .venv/bin/python benchmarks/performance.py --softmerge-impl /tmp/merge_before.py

(without ``--softmerge-impl`` the before/after rows are left out). About 30 minutes here.

What it measures (issue 5):

1. For K in {10, 50, 100, 200} and two models (SmallCNN of simulations/tasks.py, ~0.2M
   parameters, and a ~1M-parameter MLP on 28x28 inputs defined here) it builds the same K
   candidate updates for every strategy and calls each strategy's real ``aggregate_train``
   on hand-built Flower reply Messages: SoftMerge (``softmerge.server.strategy.SoftMerge``:
   reply screening, decoding, ``soft_merge`` and the ArrayRecord conversion), Flower's
   FedAvg, FedMedian, Krum, MultiKrum and Bulyan, and FLTrust
   (``softmerge.server.baselines.FLTrust``). Per strategy: the median of several
   repetitions of the aggregation seconds, and the peak resident memory above what the
   process held before the call (the reply Messages, i.e. the candidates themselves).
2. SoftMerge's seconds per gate step, against the floor: reading the (K+1) stacked
   candidates once at this machine's measured memory bandwidth, plus one forward and
   backward pass of the model on one gate batch, measured.
3. End-to-end seconds per round of the default simulation (digits, 10 clients),
   SoftMerge against FedAvg, from ``results.json`` ``round_seconds`` (median over rounds
   2..N).
4. What pre-selection (``SoftMergeConfig.max_candidates``) costs in accuracy and saves in
   time, and, with ``--softmerge-impl``, the same numbers for an older soft merge
   (before/after).

Candidates: a model trained for one epoch on 2,000 Fashion-MNIST images is the global
model; an honest candidate is global + delta + noise, with delta one more epoch of
training on 500 other images and Gaussian noise of delta's per-tensor standard deviation;
K // 10 candidates are sign-flipped and boosted (global - 4 (delta + noise)). The gate /
FLTrust root split is 300 Fashion-MNIST images, and accuracy is on 2,000 others.

Memory: each (model, K) runs in a fresh subprocess with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_), so large blocks go back to the system when freed and one
strategy's freed memory cannot hide the next one's peak. Before each call the peak RSS is
reset (``echo 5 > /proc/self/clear_refs``) and afterwards read from VmHWM, which catches
every page torch or numpy touched, however briefly (tracemalloc sees neither).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KS = (10, 50, 100, 200)
# Time linear in K: the whole merge may grow at most as K to this power (Krum's distances grow as K^2).
LINEAR_POWER = 1.1
MODELS = ("cnn", "mlp1m")
GATE_SIZE, TEST_SIZE, GATE_BATCH = 300, 2000, 128
MB = 1024 * 1024


# --------------------------------------------------------------------------- models, data


def build_model(kind: str):
    import torch
    from torch import nn

    from softmerge.simulations.tasks import SmallCNN

    class MLP1M(nn.Module):
        """784-1024-256-10 perceptron for 28x28 images: 1,068,810 parameters."""

        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.fc1 = nn.Linear(784, 1024)
            self.fc2 = nn.Linear(1024, 256)
            self.fc3 = nn.Linear(256, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(x.shape[0], -1)
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    torch.manual_seed(0)
    return SmallCNN() if kind == "cnn" else MLP1M()


def load_data():
    import numpy as np
    import torch

    from softmerge.simulations.tasks import load_fashion_mnist_arrays

    x, y = load_fashion_mnist_arrays()
    order = np.random.default_rng(0).permutation(len(y))
    x, y = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    gate = (x[:GATE_SIZE], y[:GATE_SIZE])
    test = (x[GATE_SIZE:GATE_SIZE + TEST_SIZE], y[GATE_SIZE:GATE_SIZE + TEST_SIZE])
    pool = (x[GATE_SIZE + TEST_SIZE:], y[GATE_SIZE + TEST_SIZE:])
    return gate, test, pool


def sgd(model, x, y, seed: int, lr: float = 0.05, batch: int = 32) -> None:
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    order = torch.randperm(len(y), generator=generator)
    model.train()
    for start in range(0, len(y), batch):
        index = order[start:start + batch]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()


def prepare(kind: str, path: Path) -> None:
    """Global model and honest update direction, saved for the workers."""
    import torch

    _, _, (x, y) = load_data()
    model = build_model(kind)
    sgd(model, x[:2000], y[:2000], seed=1)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sgd(model, x[2000:2500], y[2000:2500], seed=2)
    delta = {k: v.detach() - global_state[k] for k, v in model.state_dict().items()}
    torch.save({"global": global_state, "delta": delta}, path)


# --------------------------------------------------------------------------- memory probes


def malloc_for_memory(measuring: bool) -> None:
    """glibc: return every large block to the system (to measure memory), or keep blocks up to 32 MB (to time).

    With glibc's mmap threshold at 64 KB and the heap trimmed, memory freed earlier cannot
    hide a later peak from RSS. Timed calls use a fixed 32 MB threshold, the ceiling glibc's
    own adaptive threshold reaches, so that allocations repeated every gate step are reused
    rather than page-faulted afresh as they would be with the 64 KB threshold.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 * 1024 if measuring else 32 * MB)
    if measuring:
        gc.collect()
        libc.malloc_trim(0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


class PeakMemory:
    """Peak RSS during a block: VmHWM after resetting it, or 1 ms sampling if that is refused."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.method = "VmHWM reset via /proc/self/clear_refs"
        except OSError:
            self.method = "RSS sampled every 1 ms in a thread"

    def __enter__(self):
        gc.collect()
        self.base = rss_bytes()
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        else:
            self.samples = [self.base]
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.samples.append(rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.method.startswith("VmHWM"):
            self.peak = _hwm_bytes()
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.samples + [rss_bytes()])
        self.extra = max(0, self.peak - self.base)


# --------------------------------------------------------------------------- one (model, K) cell


def make_records(prepared: dict, count: int, seed: int = 3):
    """K candidate ArrayRecords (serialised once, shared by every strategy and repetition)."""
    import torch
    from flwr.app import ArrayRecord

    generator = torch.Generator().manual_seed(seed)
    attackers = count // 10
    records = []
    for k in range(count):
        sign = -4.0 if k >= count - attackers else 1.0
        state = {}
        for name, base in prepared["global"].items():
            delta = prepared["delta"][name]
            if base.dtype.is_floating_point:
                noise = torch.randn(base.shape, generator=generator) * (delta.std() if delta.numel() > 1 else 0.0)
                state[name] = base + sign * (delta + noise)
            else:
                state[name] = base.clone()
        records.append(ArrayRecord(state))
    return records


def replies_from(records):
    """Fresh reply Messages around shared arrays (Bulyan empties the records it reads)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    replies = []
    for k, record in enumerate(records):
        instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=k + 1, message_type="train")
        content = RecordDict({
            "arrays": ArrayRecord({name: array for name, array in record.items()}),
            "metrics": MetricRecord({"train-loss": 0.5, "num-examples": 100, "partition-id": k}),
        })
        replies.append(Message(content, reply_to=instruction))
    return replies


class StubGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def run_cell(kind: str, count: int, prepared_path: str, reps: int, impl: str | None, out: str) -> None:
    import logging

    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, Krum, MultiKrum
    from flwr.supercore.task_identity import TaskIdentity
    from torch import nn

    import softmerge.server.strategy as strategy_module
    from softmerge.aggregation import SoftMergeConfig, evaluate_state
    from softmerge.server.baselines import FLTrust
    from softmerge.server.replies import RoundStartMemory, harden
    from softmerge.server.strategy import SoftMerge

    logging.getLogger("flwr").setLevel(logging.ERROR)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    gate, test, _ = load_data()
    prepared = torch.load(prepared_path)
    model = build_model(kind)
    model.load_state_dict(prepared["global"])
    global_record = ArrayRecord(prepared["global"])
    parameters = sum(t.numel() for t in prepared["global"].values() if t.dtype.is_floating_point)
    records = make_records(prepared, count)
    del prepared
    f = max(1, count // 10)
    common = dict(fraction_evaluate=0.0, min_evaluate_nodes=0)

    def softmerge(**options):
        return lambda: SoftMerge(build_model(kind), gate, SoftMergeConfig(**options), **common)

    # SoftMerge calls take seconds at large K: one timed repetition fewer there.
    heavy = max(1, reps - 1) if count >= 100 else reps
    if count > max(KS):
        # Beyond the K: only where SoftMerge's linear cost meets Krum's quadratic one.
        plans = [("softmerge", softmerge(), heavy), ("softmerge steps=0", softmerge(steps=0), heavy),
                 ("fedavg", lambda: FedAvg(**common), reps),
                 ("krum", lambda: Krum(num_malicious_nodes=f, **common), heavy)]
    else:
        plans = []
    plans = plans or [
        ("softmerge", softmerge(), heavy),
        ("softmerge steps=0", softmerge(steps=0), heavy),
        ("fedavg", lambda: FedAvg(**common), reps),
        ("fedmedian", lambda: FedMedian(**common), reps),
        ("krum", lambda: Krum(num_malicious_nodes=f, **common), reps),
        # As the simulations run it: SoftMerge's time includes decoding and screening the replies, and
        # harden gives Krum the same screen.
        ("krum (screened)", lambda: harden(Krum(num_malicious_nodes=f, **common)), reps),
        ("multikrum", lambda: MultiKrum(num_malicious_nodes=f, num_nodes_to_select=count - f, **common), reps),
        ("fltrust", lambda: FLTrust(build_model(kind), gate, epochs=1, learning_rate=0.05, batch_size=32,
                                     momentum=0.9, seed=0, **common), reps),
    ]
    if count >= 4 * f + 3 and count <= max(KS):
        plans.insert(7, ("bulyan", lambda: Bulyan(num_malicious_nodes=f, **common), reps))
    if 50 <= count <= max(KS):
        for limit in (10, 25):
            plans.append((f"softmerge max_candidates={limit}", softmerge(max_candidates=limit), heavy))
    if count in (10, 100):
        for threads in (1, 2):
            plans.append((f"softmerge threads={threads}", softmerge(threads=threads), heavy))
    if impl:
        plans.append(("softmerge (before)", softmerge(), heavy))

    # The floor's compute part: one forward and backward pass on a gate batch, with the
    # merge's thread count.
    merge_threads = SoftMergeConfig().threads or torch.get_num_threads()
    process_threads = torch.get_num_threads()
    torch.set_num_threads(merge_threads)
    x, y = gate[0][:GATE_BATCH], gate[1][:GATE_BATCH]
    timings = []
    probe = build_model(kind)
    cpu_timings = []
    for _ in range(25):
        start, cpu_start = time.perf_counter(), time.process_time()
        probe.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(probe(x), y).backward()
        timings.append(time.perf_counter() - start)
        cpu_timings.append(time.process_time() - cpu_start)
    forward_backward = statistics.median(timings[5:])
    forward_backward_cpu = statistics.median(cpu_timings[5:])
    torch.set_num_threads(process_threads)

    own_loss = own_loss_loop_vs_vmap(kind, records[:8], gate) if count == 10 else None

    evaluation_model = build_model(kind)
    before_merge = _load_merge(impl).soft_merge if impl else None
    results: dict[str, dict] = {}
    factories = {}
    for name, factory, repetitions in plans:
        factories[name] = factory
        results[name] = {"strategy": name, "reps": repetitions, "all_seconds": [], "all_cpu_seconds": [],
                         "all_gate_seconds": [], "all_steps": [], "all_seconds_per_step": [],
                         "peak_extra_bytes": 0, "accuracy": None, "steps": None}

    def fresh(name: str):
        """A new strategy for every call: SoftMerge remembers each round's gates (trust over rounds), so
        the same object called again would merge a later round, from other starts, in other steps."""
        strategy = factories[name]()
        if isinstance(strategy, RoundStartMemory):
            list(strategy.configure_train(1, global_record, ConfigRecord(), StubGrid(range(1, count + 1))))
        return strategy

    def call(name: str, rep: int) -> None:
        """Call 0 measures memory (and warms up); calls 1.. are timed."""
        nonlocal memory
        strategy, result = fresh(name), results[name]
        if name == "softmerge (before)":
            saved = (strategy_module.soft_merge, strategy_module.stack_in_place)
            strategy_module.soft_merge = before_merge
            strategy_module.stack_in_place = lambda model, states, keep, units: None
        replies = replies_from(records)
        malloc_for_memory(rep == 0)
        with PeakMemory() as memory:
            start, cpu_start = time.perf_counter(), time.process_time()
            arrays, _ = strategy.aggregate_train(1, replies)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if name == "softmerge (before)":
            strategy_module.soft_merge, strategy_module.stack_in_place = saved
        if rep == 0:
            result["peak_extra_bytes"] = memory.extra
            if arrays is not None:
                evaluation_model.load_state_dict(arrays.to_torch_state_dict())
                result["accuracy"] = evaluate_state(evaluation_model, evaluation_model.state_dict(), *test)[1]
        else:
            result["all_seconds"].append(wall)
            result["all_cpu_seconds"].append(cpu)
        report = getattr(strategy, "reports", {}).get(1)
        if report is not None and rep > 0:
            # Each call's own steps and gate time: a step's cost is not one call's time over another's steps.
            result["all_steps"].append(report.steps)
            result["all_gate_seconds"].append(report.gate_seconds)
            if report.steps:
                result["all_seconds_per_step"].append(report.gate_seconds / report.steps)

    memory = None
    # SoftMerge's variants are timed round-robin, so that their differences (before/after,
    # steps=0 for the per-step time, threads, pre-selection) do not ride on the machine's
    # load drifting between them; the other strategies one after another.
    merged_names = [name for name, _, _ in plans if name.startswith("softmerge")]
    for name in merged_names:
        call(name, 0)
    for rep in range(1, max(results[n]["reps"] for n in merged_names) + 1):
        for name in merged_names:
            if rep <= results[name]["reps"]:
                call(name, rep)
    for name, _, repetitions in plans:
        if name not in merged_names:
            for rep in range(repetitions + 1):
                call(name, rep)
    rows = []
    for name, _, _ in plans:
        result = results[name]
        result["wall_seconds"] = statistics.median(result["all_seconds"])
        result["cpu_seconds"] = statistics.median(result["all_cpu_seconds"])
        result["gate_seconds"] = statistics.median(result["all_gate_seconds"]) if result["all_gate_seconds"] else None
        if result["all_steps"]:
            result["steps"] = int(statistics.median_low(result["all_steps"]))
        if result["all_seconds_per_step"]:
            result["seconds_per_step"] = statistics.median(result["all_seconds_per_step"])
        rows.append(result)
        print(f"  {kind} K={count} {name}: {result['wall_seconds']:.3f}s wall, {result['cpu_seconds']:.3f}s CPU, "
              f"+{result['peak_extra_bytes'] / MB:.0f} MB, acc {result['accuracy']}, steps {result['steps']}",
              file=sys.stderr, flush=True)
    Path(out).write_text(json.dumps({
        "model": kind, "K": count, "parameters": parameters, "f": f, "forward_backward_wall": forward_backward,
        "forward_backward_cpu": forward_backward_cpu,
        "threads": torch.get_num_threads(), "merge_threads": merge_threads, "memory_method": memory.method,
        "rows": rows, "own_loss": own_loss,
    }))


def own_loss_loop_vs_vmap(kind: str, records, gate) -> dict:
    """Each candidate's own gate-split loss: the loop soft_merge runs, against torch.func.vmap over stacked weights."""
    import torch
    from torch.func import functional_call, vmap

    from softmerge.aggregation import evaluate_state

    model = build_model(kind).eval()
    states = [record.to_torch_state_dict() for record in records]
    stacked = {name: torch.stack([state[name] for state in states]) for name in states[0]}
    x, y = gate

    def batched(params):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    timings = {"loop": [], "vmap": []}
    for _ in range(3):
        start = time.perf_counter()
        loop = [evaluate_state(model, state, x, y)[0] for state in states]
        timings["loop"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            vectorised = vmap(batched)(stacked)
        timings["vmap"].append(time.perf_counter() - start)
    assert max(abs(a - float(b)) for a, b in zip(loop, vectorised)) < 1e-3
    return {"candidates": len(states), "loop": min(timings["loop"]), "vmap": min(timings["vmap"])}


def _load_merge(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("softmerge.aggregation._merge_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- end to end


def run_e2e(rounds: int, impl: str | None, out: str) -> None:
    """The default simulation (digits, 10 clients, default attack) per strategy, one after another."""
    import softmerge.server.strategies as strategies_module
    import softmerge.server.strategy as strategy_module
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.engine import run_experiment

    runs = [("fedavg", "fedavg", {}), ("softmerge", "softmerge", {}), ("fedavg", "fedavg", {}),
            ("softmerge", "softmerge", {}), ("softmerge max_candidates=5", "softmerge", {"max_candidates": 5})]
    if impl:
        runs.append(("softmerge (before)", "softmerge", {"before": True}))
    results = []
    original_config = strategies_module.merge_config_from
    original_merge = (strategy_module.soft_merge, strategy_module.stack_in_place)
    with tempfile.TemporaryDirectory() as directory:
        for index, (label, name, options) in enumerate(runs):
            options = dict(options)
            if options.pop("before", False):
                strategy_module.soft_merge = _load_merge(impl).soft_merge
                strategy_module.stack_in_place = lambda model, states, keep, units: None
            if options:
                from dataclasses import replace

                # Bound as a default: the lambda keeps this run's options, whenever it is called.
                strategies_module.merge_config_from = (
                    lambda settings, options=options: replace(original_config(settings), **options))
            settings = parse_run_config({"strategy": name, "num-server-rounds": rounds, "resume": False,
                                         "output-dir": f"{directory}/{index}"})
            started = time.perf_counter()
            run_experiment(settings, 10, log_file=Path(directory) / f"{index}.log")
            wall = time.perf_counter() - started
            strategies_module.merge_config_from = original_config
            strategy_module.soft_merge, strategy_module.stack_in_place = original_merge
            entries = json.loads(Path(f"{directory}/{index}/results.json").read_text())["rounds"]
            results.append({"label": label, "wall": wall,
                            "round_seconds": [e["round_seconds"] for e in entries if e["round"] >= 2],
                            "aggregate_seconds": [e["aggregate_seconds"] for e in entries if e["round"] >= 2],
                            "steps": [e["gate_steps"] for e in entries if e["round"] >= 1],
                            "accuracy": entries[-1]["test_accuracy"]})
            print(f"  e2e {label}: median round {statistics.median(results[-1]['round_seconds']):.3f}s, "
                  f"accuracy {results[-1]['accuracy']:.3f}", file=sys.stderr, flush=True)
    Path(out).write_text(json.dumps(results))


# --------------------------------------------------------------------------- accuracy before/after


def run_accuracy(variant: str, impl: str | None, runs: list[str], rounds: int, out: str) -> None:
    """Digits simulations (10 clients) with SoftMerge; ``variant`` 'before' swaps in ``impl``'s soft merge."""
    import softmerge.server.strategy as strategy_module
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.engine import run_experiment

    if variant == "before":
        strategy_module.soft_merge = _load_merge(impl).soft_merge
        strategy_module.stack_in_place = lambda model, states, keep, units: None
    results = []
    with tempfile.TemporaryDirectory() as directory:
        for item in runs:
            attack, seed = item.split(":")
            settings = parse_run_config({"strategy": "softmerge", "num-server-rounds": rounds, "resume": False,
                                         "attack": attack, "seed": int(seed), "output-dir": f"{directory}/{item}"})
            run_experiment(settings, 10, log_file=Path(directory) / f"{item}.log")
            entries = json.loads(Path(f"{directory}/{item}/results.json").read_text())["rounds"]
            results.append({"attack": attack, "seed": int(seed), "final": entries[-1]["test_accuracy"],
                            "last5": sum(e["test_accuracy"] for e in entries[-5:]) / 5,
                            "steps": [e["gate_steps"] for e in entries if e["round"] >= 1]})
            print(f"  accuracy {variant} {item}: {results[-1]['final']:.3f}", file=sys.stderr, flush=True)
    Path(out).write_text(json.dumps(results))


def accuracy_section(data: dict) -> list[str]:
    lines = ["## Accuracy before and after", "",
             f"`softmerge-sim`'s setting (digits, 10 clients, {data['rounds']} rounds, SoftMerge defaults) per attack",
             "and seed, with the soft merge before this change (`--softmerge-impl`) and after. Test accuracy on",
             f"the 360-image server test split; measured {data['date']} (accuracy does not depend on machine load)",
             "with:", "", "```", data.get("command", "(command not recorded)"), "```",
             "", "| attack | seed | final before | final after | mean of last 5 rounds before | after | "
             "gate steps per round before | after |", "|---|---:|---:|---:|---:|---:|---|---|"]
    before = {(r["attack"], r["seed"]): r for r in data["before"]}
    finals, lasts = [], []
    for after in data["after"]:
        key = (after["attack"], after["seed"])
        b = before[key]
        finals.append((b["final"], after["final"]))
        lasts.append((b["last5"], after["last5"]))
        lines.append(f"| {key[0]} | {key[1]} | {b['final']:.3f} | {after['final']:.3f} | {b['last5']:.3f} | "
                     f"{after['last5']:.3f} | {' '.join(map(str, b['steps']))} | "
                     f"{' '.join(map(str, after['steps']))} |")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    lines += ["", f"Means over the {len(finals)} runs: final accuracy {mean([b for b, _ in finals]):.4f} before, "
              f"{mean([a for _, a in finals]):.4f} after; mean of the last 5 rounds {mean([b for b, _ in lasts]):.4f} "
              f"before, {mean([a for _, a in lasts]):.4f} after; gate steps per round "
              f"{mean([s for r in data['before'] for s in r['steps']]):.0f} before, "
              f"{mean([s for r in data['after'] for s in r['steps']]):.0f} after.", ""]
    data["summary"] = (mean([b for b, _ in finals]), mean([a for _, a in finals]),
                       mean([b for b, _ in lasts]), mean([a for _, a in lasts]))
    return lines


# --------------------------------------------------------------------------- machine


def bandwidth() -> dict:
    """Read bandwidth: torch sum over a 1 GiB float32 tensor, best of 5, per thread count."""
    import torch

    data = torch.ones(2**28, dtype=torch.float32)
    result = {"wall": {}, "cpu": {}}
    previous = torch.get_num_threads()
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for clock, timer in (("wall", time.perf_counter), ("cpu", time.process_time)):
            best = min(_timed(lambda: data.sum(), timer) for _ in range(5))
            # CPU time counts every thread: per thread it is the wall time of an unshared core.
            result[clock][threads] = data.numel() * 4 / (best / (threads if clock == "cpu" else 1))
    torch.set_num_threads(previous)
    return result


def _timed(function, timer=time.perf_counter) -> float:
    start = timer()
    function()
    return timer() - start


def machine() -> dict:
    import torch

    from softmerge.server.results import software_versions

    cpu = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        memory = int(handle.readline().split()[1]) * 1024
    return {"nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(), "cpu": cpu,
            "ram_gib": memory / 1024**3, "kernel": platform.release(), **software_versions(),
            "torch_threads": torch.get_num_threads(),
            "nice": os.nice(0), "loadavg": os.getloadavg(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


# --------------------------------------------------------------------------- report


def _growth(xs, ys) -> float:
    """The exponent p of ys ~ xs^p, by least squares on log-log axes."""
    return _fit([math.log(x) for x in xs], [math.log(y) for y in ys])[1]


def _fit(xs, ys):
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    worst = max(abs(intercept + slope * x - y) / y for x, y in zip(xs, ys))
    return intercept, slope, worst


def softmerge_defaults() -> str:
    """The SoftMerge defaults of this checkout, read from the code, so a report cannot outlive a change of them."""
    from softmerge.aggregation.merge import SoftMergeConfig

    config = SoftMergeConfig()
    units = "one gate per candidate" if config.units == "model" else f"units {config.units!r}"
    keep = f"the keep model in mode {config.keep_mode!r}" if config.include_keep else "no keep model"
    return (f"{units}, {config.mode} mode, at most {config.steps} steps (a convergence check every "
            f"{config.check_every}), lr {config.lr}, L0 {config.l0_lambda}, batch {config.batch_size}, {keep}, "
            f"mirror test {'on' if config.mirror_test else 'off'}, no-harm margin {config.harm_margin} nats")


def write_report(path: Path, info: dict, bw: dict, cells: list[dict], e2e: list[dict] | None, command: str,
                 elapsed: float, impl: str | None, clock: str = "wall") -> dict:
    # Runs since 2026-12-07 time every call on a strategy of its own and keep each call's cost per step.
    per_call = any(row.get("seconds_per_step") is not None for cell in cells for row in cell["rows"])
    best_bw = max(bw.values())
    lines = [
        "# Performance of SoftMerge (issue 5)",
        "",
        f"Written by `benchmarks/performance.py` on {info['date']}, in {elapsed / 60:.1f} minutes:",
        "",
        "```",
        command,
        "```",
        "",
        f"- Machine: {info['nproc']} cores (`nproc`), {info['cpu']}, {info['ram_gib']:.1f} GiB RAM, "
        f"Linux {info['kernel']}, no GPU.",
        f"- Software: Python {info['python']}, torch {info['torch']}, flwr {info['flwr']}; torch's default "
        f"intra-op threads here {info['torch_threads']} (what each timing ran with is under Conditions).",
        f"- Memory read bandwidth (torch `sum` over 1 GiB of float32, best of 5, {clock} clock): "
        + ", ".join(f"{t} thread{'s' if t > 1 else ''} {v / 1e9:.1f} GB/s" for t, v in sorted(bw.items()))
        + "; the floor uses the one at SoftMerge's thread count.",
        "",
        "## Method",
        "",
        "- Every strategy gets the same K candidate models as Flower reply Messages, and its real",
        "  `aggregate_train` is timed: SoftMerge is `softmerge.server.strategy.SoftMerge.aggregate_train`",
        "  (reply screening and decoding, `soft_merge`, and the ArrayRecord it returns), the others are",
        f"  Flower {info['flwr']}'s `FedAvg`, `FedMedian`, `Krum`, `MultiKrum`, `Bulyan` unchanged, and our `FLTrust`",
        "  (`softmerge.server.baselines`, server model trained 1 epoch on the 300-image root set, lr 0.05, batch",
        "  32, momentum 0.9). f = max(1, K // 10) for Krum, MultiKrum (selecting K - f) and Bulyan",
        "  (run only where K >= 4f + 3). Flower's log is silenced to errors for all of them.",
        "- Candidates: the global model is trained for one epoch on 2,000 Fashion-MNIST images; an honest",
        "  candidate is global + delta + noise (delta: one more epoch on 500 other images; noise: Gaussian",
        "  with each tensor's standard deviation of delta); K // 10 candidates are global - 4 (delta + noise).",
        "  SoftMerge's gate split and FLTrust's root set are the same 300 images; accuracy is on 2,000 others.",
        "- SoftMerge runs with `SoftMergeConfig()` defaults: "
        + info.get("softmerge_defaults", "not recorded with this run (measured before the script recorded them)")
        + ".",
        "- Seconds: median of the timed repetitions (the mean of two where K >= 100 times two), same process, "
        "one strategy after another"
        + ("; every call on a strategy of its own (SoftMerge remembers past rounds: called again, one object "
           "would merge a later round in other steps); "
           if per_call else
           "; this run called one strategy object for every repetition, so SoftMerge's later calls merged what "
           "its trust over rounds made a later round; ")
        + ("wall-clock seconds." if clock == "wall" else
           "**CPU seconds** of the process (`time.process_time`), not wall-clock: with every strategy on one "
           "thread, that is what each would take on an idle core, which wall time on a shared machine is not. "
           "The bandwidth and the forward/backward pass of the floor are timed the same way. The end-to-end "
           "runs span several processes and are wall-clock."),
        f"- Memory: {cells[0]['memory_method'] if cells else ''}, one fresh subprocess per (model, K). Each",
        "  strategy is called once for memory before the timed calls, with glibc's mmap threshold at 64 KB and",
        "  the heap trimmed (`mallopt`, `malloc_trim`), so that blocks freed earlier cannot hide a peak;",
        "  the timed calls run with a fixed 32 MB threshold (glibc's adaptive ceiling), so blocks reused every",
        "  step are not page-faulted afresh. *Extra MB* is the peak RSS during `aggregate_train` minus the RSS",
        "  just before it, when the process already holds the reply Messages (the candidates themselves).",
        "- Floor of a gate step: (K+1) x d float32 read once at the bandwidth above (the K candidates and the",
        "  keep candidate) plus one forward and backward pass of the model on a 128-image gate batch",
        "  (measured, median of 20), both with SoftMerge's thread count. SoftMerge's seconds per step are "
        + ("the median over the timed calls of each call's seconds learning gates (`GateReport.gate_seconds`, "
           "wall clock) / its own steps, so they include the convergence checks."
           if per_call else
           "the seconds it spent learning gates (`GateReport.gate_seconds`, wall clock, median of the timed "
           "calls) / the last call's steps, so they include the convergence checks."
           if any(row.get("gate_seconds") is not None for cell in cells for row in cell["rows"]) else
           "(its seconds - its seconds with `steps=0`) / steps taken, so they include the convergence checks; "
           "this run predates the timing of gate learning itself, and where the scoring before the first step "
           "is most of the merge (the SmallCNN at large K) the difference is noise."),
        "",
    ]
    summary = {"targets": []}
    by_model: dict[str, list[dict]] = {}
    for cell in cells:
        by_model.setdefault(cell["model"], []).append(cell)

    for kind, model_cells in by_model.items():
        parameters = model_cells[0]["parameters"]
        model_mb = parameters * 4 / MB
        title = "SmallCNN" if kind == "cnn" else "MLP 784-1024-256-10"
        lines += [f"## {title}: {parameters:,} parameters ({model_mb:.2f} MB as float32)", ""]
        lines += ["| K | strategy | seconds | x Krum | x FedAvg | extra MB | target MB | test acc | gate steps |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for cell in sorted(model_cells, key=lambda c: c["K"]):
            rows = {r["strategy"]: r for r in cell["rows"]}
            krum, fedavg = rows["krum"]["seconds"], rows["fedavg"]["seconds"]
            target_mb = (cell["K"] + 4) * model_mb + 200
            for row in cell["rows"]:
                if row["strategy"] == "softmerge steps=0":
                    continue
                target = f"{target_mb:.0f}" if row["strategy"].startswith("softmerge") else ""
                accuracy = "" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
                steps = "" if row["steps"] is None else str(row["steps"])
                lines.append(
                    f"| {cell['K']} | {row['strategy']} | {row['seconds']:.3f} | {row['seconds'] / krum:.2f} | "
                    f"{row['seconds'] / fedavg:.1f} | {row['peak_extra_bytes'] / MB:.0f} | {target} | "
                    f"{accuracy} | {steps} |")
        lines.append("")

        lines += [f"### {title}: SoftMerge's gate step against the floor", "",
                  "| K | steps | s/step | floor s/step | read part | fwd+bwd part | x floor | s with steps=0 |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        step_ratios, ks, times, per_steps = [], [], [], []
        for cell in sorted(model_cells, key=lambda c: c["K"]):
            rows = {r["strategy"]: r for r in cell["rows"]}
            main, zero = rows["softmerge"], rows["softmerge steps=0"]
            read = (cell["K"] + 1) * parameters * 4 / bw.get(cell.get("merge_threads"), best_bw)
            floor = read + cell["forward_backward_seconds"]
            per_step = seconds_per_step(main, zero)
            step_ratios.append((cell["K"], per_step / floor))
            ks.append(cell["K"])
            times.append(main["seconds"])
            per_steps.append(per_step)
            lines.append(f"| {cell['K']} | {main['steps']} | {per_step:.4f} | {floor:.4f} | {read:.4f} | "
                         f"{cell['forward_backward_seconds']:.4f} | {per_step / floor:.2f} | {zero['seconds']:.3f} |")
        lines.append("")
        if len(ks) >= 3:
            a, b, worst = _fit(ks, times)
            a2, b2, worst2 = _fit(ks, per_steps)
            power, power_step = _growth(ks, times), _growth(ks, per_steps)
            lines += [f"Linearity in K: SoftMerge seconds grow as K^{power:.2f} (least squares on log-log axes; "
                      f"1 is linear, below 1 the fixed cost still weighs), seconds per step as K^{power_step:.2f}. "
                      f"On straight lines: seconds = {a:.3f} + {b * 1000:.2f} ms x K (worst point off by "
                      f"{worst:.0%}); seconds per step = {a2:.4f} + {b2 * 1e6:.1f} us x K (worst {worst2:.0%}). "
                      "The number of steps is decided by the early stop, so whole-merge seconds also move with "
                      "it.", ""]
            summary.setdefault("linear", {})[kind] = (power, power_step)

        # target bookkeeping
        for cell in model_cells:
            rows = {r["strategy"]: r for r in cell["rows"]}
            target_mb = (cell["K"] + 4) * model_mb + 200
            summary.setdefault("memory", []).append(
                (kind, cell["K"], rows["softmerge"]["peak_extra_bytes"] / MB, target_mb))
            summary.setdefault("krum", []).append(
                (kind, cell["K"], rows["softmerge"]["seconds"], rows["krum"]["seconds"]))
        summary.setdefault("steps", []).extend((kind, k, r) for k, r in step_ratios)

    # Threads and pre-selection, and before/after
    lines += ["## Threads", "",
              "SoftMerge with `threads=1` and `threads=2` (`SoftMergeConfig.threads`; the default is 1), wall-clock",
              "and CPU seconds (CPU seconds add up both threads):", "",
              "| model | K | threads=1 wall s | threads=2 wall s | threads=1 CPU s | threads=2 CPU s |",
              "|---|---:|---:|---:|---:|---:|"]
    for cell in cells:
        rows = {r["strategy"]: r for r in cell["rows"]}
        if "softmerge threads=1" in rows:
            one, two = rows["softmerge threads=1"], rows["softmerge threads=2"]
            lines.append(f"| {cell['model']} | {cell['K']} | {one['wall_seconds']:.3f} | {two['wall_seconds']:.3f} | "
                         f"{one['cpu_seconds']:.3f} | {two['cpu_seconds']:.3f} |")
    lines += ["", "## Pre-selection (`max_candidates`)", "",
              "Before stacking, only the M client candidates with the lowest own gate-split loss are kept (the",
              "keep candidate always is). Accuracy is the merged model's on the 2,000 test images.", "",
              "| model | K | M | seconds | x full | extra MB | test acc | full test acc | gate steps |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in cells:
        rows = {r["strategy"]: r for r in cell["rows"]}
        for limit in (10, 25):
            row = rows.get(f"softmerge max_candidates={limit}")
            if row:
                full = rows["softmerge"]
                lines.append(f"| {cell['model']} | {cell['K']} | {limit} | {row['seconds']:.3f} | "
                             f"{row['seconds'] / full['seconds']:.2f} | {row['peak_extra_bytes'] / MB:.0f} | "
                             f"{row['accuracy']:.3f} | {full['accuracy']:.3f} | {row['steps']} |")
    lines.append("")
    if impl:
        lines += ["## Before and after", "",
                  f"`softmerge (before)` is the soft merge of `{impl}` (see the command) inside today's strategy,",
                  "without in-place stacking, timed round-robin with today's SoftMerge. The old merge did not set",
                  "threads, so it ran with torch's default (2 here); today's default is 1. For seconds at equal",
                  "threads compare it with the `softmerge threads=2` rows; memory and accuracy do not depend on it.",
                  "",
                  "| model | K | before s | after s | before extra MB | after extra MB | before acc | after acc | "
                  "before steps | after steps |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for cell in cells:
            rows = {r["strategy"]: r for r in cell["rows"]}
            if "softmerge (before)" in rows:
                b, a = rows["softmerge (before)"], rows["softmerge"]
                lines.append(f"| {cell['model']} | {cell['K']} | {b['seconds']:.3f} | {a['seconds']:.3f} | "
                             f"{b['peak_extra_bytes'] / MB:.0f} | {a['peak_extra_bytes'] / MB:.0f} | "
                             f"{b['accuracy']:.3f} | {a['accuracy']:.3f} | {b['steps']} | {a['steps']} |")
        lines.append("")

    if e2e:
        lines += ["## End to end: the default simulation", "",
                  "`softmerge.simulations.engine.run_experiment` with the default settings (digits, 10 clients, 3",
                  "of them sending extreme values, SoftMerge defaults), runs one after another in one process;",
                  "seconds per round from `results.json` `round_seconds`, median over rounds 2..N.",
                  f"Flower's in-memory grid looks for the clients' replies every {reply_poll_seconds()} s, so a",
                  "round's client phase lasts a whole number of those intervals: a run whose clients all reply",
                  "within one has rounds of about one interval, one that needs a little more, about two. The",
                  "server's work (aggregation, test evaluation) comes on top, so 'added' below is SoftMerge's",
                  "extra seconds per round against FedAvg's.", "",
                  "| run | median s/round | median aggregation s | final test acc | gate steps per round | wall s |",
                  "|---|---:|---:|---:|---|---:|"]
        for run in e2e:
            aggregate = [s for s in run["aggregate_seconds"] if s is not None]
            lines.append(f"| {run['label']} | {statistics.median(run['round_seconds']):.3f} | "
                         f"{statistics.median(aggregate) if aggregate else float('nan'):.3f} | {run['accuracy']:.3f} | "
                         f"{' '.join(str(s) for s in run['steps'] if s is not None)} | {run['wall']:.0f} |")
        fedavg, soft = pooled_round_seconds(e2e)
        summary["e2e"] = soft / fedavg
        lines += ["", f"Pooled over the two runs of each: SoftMerge {soft:.3f} s per round, "
                      f"FedAvg {fedavg:.3f} s, ratio {soft / fedavg:.2f}, added {soft - fedavg:.3f} s.", ""]
    summary["lines"] = lines
    return summary


def seconds_per_step(main: dict, zero: dict) -> float:
    """SoftMerge's seconds per gate step: the gate-learning time its report measured, over its steps.

    Since 2026-12-07 the median over the timed calls of each call's gate time over its own
    steps. Earlier runs reused one strategy for every call, so its trust over rounds made each
    call a later round; they have the median gate time over the last call's steps. Runs saved
    before the report timed gate learning (2026-12-05) have only the two totals, and get
    (seconds - seconds with steps=0) / steps, which is noise wherever the scoring before the
    first step is most of the merge (the SmallCNN at large K).
    """
    if main.get("seconds_per_step") is not None:
        return main["seconds_per_step"]
    if not main["steps"]:
        return float("nan")
    if main.get("gate_seconds") is not None:
        return main["gate_seconds"] / main["steps"]
    return (main["seconds"] - zero["seconds"]) / main["steps"]


def targets_section(summary: dict, accuracy_note: str, accuracy_met: str) -> list[str]:
    lines = ["## Targets of issue 5", "", "| target | result | met |", "|---|---|---|"]
    krum_100 = [(m, s, k) for m, K, s, k in summary.get("krum", []) if K == 100]
    if krum_100:
        text = "; ".join(f"{m}: {s:.2f} s vs Krum {k:.2f} s ({s / k:.1f}x)" for m, s, k in krum_100)
        lines.append(f"| K=100: SoftMerge aggregation time <= Krum's | {text} | "
                     f"{'met' if all(s <= k for _, s, k in krum_100) else 'not met'} |")
    crossing = {}
    for m, K, s, k in sorted(summary.get("krum", []), key=lambda item: (item[0], item[1])):
        crossing.setdefault(m, []).append((K, s, k))
    for m, points in crossing.items():
        below = [K for K, s, k in points if s <= k]
        text = ", ".join(f"K={K}: {s / k:.2f}x" for K, s, k in points)
        lines.append(f"| (as K grows) SoftMerge at most Krum's time, {m} | {text} | "
                     + (f"from K={below[0]}" if below else f"not up to K={points[-1][0]}") + " |")
    if "linear" in summary:
        text = "; ".join(f"{m}: the merge grows as K^{p:.2f}, a step as K^{p2:.2f}"
                         for m, (p, p2) in summary["linear"].items())
        # Linear or slower: a quadratic cost (Krum's) would read near 2 at these K.
        ok = all(p <= LINEAR_POWER for p, _ in summary["linear"].values())
        lines.append(f"| time linear in K | {text} | {'met' if ok else 'not met'} (whole merge, exponent at most "
                     f"{LINEAR_POWER}) |")
    if summary.get("memory"):
        worst = max(summary["memory"], key=lambda item: item[2] / item[3])
        ok = all(extra <= target for _, _, extra, target in summary["memory"])
        lines.append(f"| peak extra memory <= (K+4) x model + 200 MB | worst: {worst[0]} K={worst[1]} "
                     f"{worst[2]:.0f} MB of {worst[3]:.0f} MB allowed | {'met' if ok else 'not met'} |")
    if summary.get("steps"):
        worst = max(summary["steps"], key=lambda item: item[2])
        ok = all(r <= 3 for _, _, r in summary["steps"])
        lines.append(f"| seconds per gate step within 3x of the floor | worst: {worst[0]} K={worst[1]} "
                     f"{worst[2]:.2f}x | {'met' if ok else 'not met'} |")
    if "e2e" in summary:
        lines.append(f"| end-to-end s/round of the default simulation <= 1.25x FedAvg's | {summary['e2e']:.2f}x | "
                     f"{'met' if summary['e2e'] <= 1.25 else 'not met'} |")
    lines.append(f"| accuracy does not drop | {accuracy_note} | {accuracy_met} |")
    return lines + [""]


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "performance.md"))
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--crossover-ks", default="400,800",
                        help="larger K for the SmallCNN only, SoftMerge and Krum (and FedAvg): where the "
                             "linear cost meets the quadratic one ('' to skip)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per strategy (default 3)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="report wall-clock seconds (default), or the process's CPU seconds: with --threads 1 "
                             "the better stand-in for an idle machine's wall time while other jobs run")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of torch, OpenMP and BLAS for every strategy (default 1, SoftMerge's "
                             "own default, so every rule gets the same share of the machine; 0: as set)")
    parser.add_argument("--rounds", type=int, default=12, help="rounds of each end-to-end run (default 12)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end simulations")
    parser.add_argument("--e2e-only", action="store_true",
                        help="run only the end-to-end simulations and print their summary; the report is not "
                             "rewritten")
    parser.add_argument("--softmerge-impl", default=None,
                        help="an older aggregation/merge.py to measure as 'softmerge (before)', e.g. from "
                             "`git show <commit>:aggregation/merge.py > /tmp/merge_before.py`")
    parser.add_argument("--notes", default=None, help="a markdown file appended to the report")
    parser.add_argument("--accuracy", default=None, metavar="ATTACK:SEED,...",
                        help="also run digits simulations before/after (needs --softmerge-impl; slow, and not "
                             "timing-sensitive) and store them in --accuracy-json")
    parser.add_argument("--accuracy-json", default=str(REPO / "docs" / "performance-accuracy.json"),
                        help="before/after accuracy results, included in the report when the file exists")
    parser.add_argument("--accuracy-only", action="store_true", help="run --accuracy and stop")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the report from the measurements saved next to it (<out>.json)")
    parser.add_argument("--accuracy-worker", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=5, metavar=("MODEL", "K", "PREPARED", "REPS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--e2e-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, count, prepared, reps, out = args.worker
        run_cell(kind, int(count), prepared, int(reps), args.softmerge_impl, out)
        return 0
    if args.e2e_worker:
        run_e2e(args.rounds, args.softmerge_impl, args.e2e_worker)
        return 0
    if args.accuracy_worker:
        run_accuracy(args.accuracy_worker[0], args.softmerge_impl, args.accuracy.split(","), 10,
                     args.accuracy_worker[1])
        return 0
    if args.e2e_only:
        print_e2e_summary(measure_e2e(args))
        return 0
    if args.accuracy:
        if not args.softmerge_impl:
            parser.error("--accuracy needs --softmerge-impl")
        data = {"date": datetime.date.today().isoformat(), "rounds": 10, "runs": args.accuracy,
                "command": " ".join([".venv/bin/python", "benchmarks/performance.py"]
                                    + (argv or sys.argv[1:]))}
        with tempfile.TemporaryDirectory() as directory:
            for variant in ("before", "after"):
                out = Path(directory) / f"{variant}.json"
                subprocess.run([sys.executable, __file__, "--accuracy-worker", variant, str(out), "--accuracy",
                                args.accuracy, "--softmerge-impl", args.softmerge_impl], check=True, cwd=REPO)
                data[variant] = json.loads(out.read_text())
        Path(args.accuracy_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.accuracy_json).write_text(json.dumps(data, indent=1))
        if args.accuracy_only:
            return 0

    raw_path = Path(args.out).with_suffix(".json")
    if not args.render_only:
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps(measure(args, argv), indent=1))
    render(json.loads(raw_path.read_text()), args)
    return 0


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    started = time.perf_counter()
    command = " ".join([".venv/bin/python", "benchmarks/performance.py"] + (argv or sys.argv[1:]))
    # Recorded now, so that a later --render-only describes the defaults this run measured.
    info = {**machine(), "softmerge_defaults": softmerge_defaults()}
    print(f"machine: {info}", file=sys.stderr)
    bw = bandwidth()
    print(f"bandwidth: {bw}", file=sys.stderr)
    environment = worker_environment(args.threads)
    cells = []
    with tempfile.TemporaryDirectory() as directory:
        for kind in args.models.split(","):
            prepared = Path(directory) / f"{kind}.pt"
            prepare(kind, prepared)
            extra = [int(k) for k in args.crossover_ks.split(",") if k] if kind == "cnn" else []
            for count in [int(k) for k in args.ks.split(",")] + extra:
                out = Path(directory) / f"{kind}-{count}.json"
                worker = [sys.executable, __file__, "--worker", kind, str(count), str(prepared), str(args.reps),
                          str(out)]
                if args.softmerge_impl:
                    worker += ["--softmerge-impl", args.softmerge_impl]
                subprocess.run(worker, check=True, env=environment, cwd=REPO)
                cells.append(json.loads(out.read_text()))
    e2e = None if args.no_e2e else measure_e2e(args)
    return {"machine": info, "bandwidth": bw, "cells": cells, "e2e": e2e, "command": command,
            "elapsed": time.perf_counter() - started, "impl": args.softmerge_impl, "threads": args.threads,
            "clock": args.clock,
            "loadavg_end": os.getloadavg()}


def worker_environment(threads: int) -> dict:
    """The environment of the measuring subprocesses: no Flower telemetry, and ``threads`` (if set) for
    OpenMP and the BLAS libraries."""
    environment = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    if threads:
        for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            environment[variable] = str(threads)
    return environment


def measure_e2e(args: argparse.Namespace) -> list[dict]:
    """The end-to-end runs (see :func:`run_e2e`), in a fresh process so that nothing measured before warms it."""
    # The default simulation as users run it: torch's own thread counts for clients and server alike
    # (--threads levels the aggregation timings only).
    environment = worker_environment(0)
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "e2e.json"
        worker = [sys.executable, __file__, "--e2e-worker", str(out), "--rounds", str(args.rounds)]
        if args.softmerge_impl:
            worker += ["--softmerge-impl", args.softmerge_impl]
        subprocess.run(worker, check=True, env=environment, cwd=REPO)
        return json.loads(out.read_text())


def pooled_round_seconds(e2e: list[dict]) -> tuple[float, float]:
    """FedAvg's and SoftMerge's median seconds per round, each pooled over its runs with the default settings."""
    return tuple(statistics.median(s for run in e2e if run["label"] == label for s in run["round_seconds"])
                 for label in ("fedavg", "softmerge"))


def reply_poll_seconds() -> float:
    """How often Flower's simulation looks for replies (``InMemoryGrid``'s default ``pull_interval``)."""
    import inspect

    from flwr.superlink.grid import InMemoryGrid

    return inspect.signature(InMemoryGrid.__init__).parameters["pull_interval"].default


def print_e2e_summary(e2e: list[dict]) -> None:
    print(f"load average at the end: {os.getloadavg()}")
    print("| run | median s/round | median aggregation s | final test acc |")
    print("|---|---:|---:|---:|")
    for run in e2e:
        aggregation = [s for s in run["aggregate_seconds"] if s is not None and s == s]
        print(f"| {run['label']} | {statistics.median(run['round_seconds']):.3f} | "
              f"{statistics.median(aggregation) if aggregation else float('nan'):.3f} | {run['accuracy']:.3f} |")
    fedavg, soft = pooled_round_seconds(e2e)
    print(f"SoftMerge / FedAvg, median s/round pooled over the runs of each: {soft / fedavg:.2f} "
          f"(added {soft - fedavg:.3f} s; Flower looks for replies every {reply_poll_seconds()} s)")


def discussion(raw: dict) -> list[str]:
    """What changed and what the numbers mean; measured values are filled in from ``raw``."""
    lines = [
        "## What the first speed change did (2026-11-22), and why", "",
        "1. **An early stop that can fire, and does not fire too soon.** Before, gate learning stopped when no",
        "   deterministic gate had moved by more than 1e-3 over 10 steps. With Adam at lr 0.1 on sampled gates",
        "   the gates never stop moving, so every merge ran all 100 steps (the 2026-11-22 run's `before` rows; the",
        ("   reference grid's first results.json showed 100 steps in every round). "
         "Now every `check_every` = 10 steps the"),
        "   deterministic gates are scored by the objective itself without noise (cross-entropy of the merge",
        "   they build on at most 2 x 128 gate examples, plus the L0 term). Learning stops after `patience` = 2",
        "   checks in a row that did not improve by more than `tolerance` = 0.01 nats on the last check that",
        "   did (Keras' min_delta rule), and never before the most open starting gate could have closed at",
        "   `lr` per step (44 steps by default). The best-scoring checked gates are kept, the start included,",
        "   so a merge never ends worse on its own objective than it began. Two versions were measured and",
        "   dropped on the way: measuring progress from the running best stopped slow, steady progress (0.007",
        "   nats a check) at 20 steps and lost 3 points on the SmallCNN K=50 cell; without the 44-step floor,",
        "   the MLP K=100 merge stopped at 20 steps, where its objective had barely moved because no gate had",
        "   yet crossed over, and lost 6 points (0.666 against 0.7245). Steps taken on the synthetic candidates",
        "   here: " + ", ".join(
            f"{c['model']} K={c['K']}: {next(r['steps'] for r in c['rows'] if r['strategy'] == 'softmerge')}"
            for c in raw["cells"]) + " (of at most 100);",
        "   in the federated runs see 'Accuracy before and after' and the end-to-end table.",
        "2. **Less work per step.** The stacked (K, d_u) matrices are filled row by row without temporary",
        "   copies; a step mixes with one vector-matrix product per unit and no loop over candidates (as",
        "   before), and its fixed costs are smaller: the gradient clip written out, the keep fall-back built once,",
        "   `functional_call(..., tie_weights=False)` (every name is passed), the unit layout precomputed. The",
        "   keep candidate's own loss is the `loss_before` already computed.",
        "3. **One copy of the candidates.** `SoftMerge.aggregate_train` moves each decoded reply into the",
        "   stacked matrices (`stack_in_place`) and drops it, and `soft_merge` recognises that layout and",
        "   uses it without copying. Before, the decoded replies and their stacked copy were both alive:",
        "   about two model copies per candidate.",
        "4. **`threads`** (`SoftMergeConfig.threads`, default 1): torch intra-op threads during the merge,",
        "   restored afterwards; 0 leaves torch's setting (one per core). One is the default on this 2-core",
        "   machine: the contraction is memory-bound (compare the 1- and 2-thread bandwidths above), and when",
        "   anything else runs on the machine a second OpenMP thread makes a SmallCNN gate step several times",
        "   slower (measured here under load: 40-48 ms per step with 1 thread, 260-320 ms with 2, K=50). On an",
        "   idle machine 2 threads may be faster for the CNN's convolutions; see 'Threads' for this run.",
        "5. **`max_candidates`** (`SoftMergeConfig.max_candidates`, default 0 = off): pre-selection for more",
        "   clients than one round can gate. Each valid candidate's own gate-split loss is computed anyway",
        "   (for the warm start); with the option only the M lowest are stacked and gated, the others are",
        "   reported as excluded ('pre-selection: ...'). Gate steps then read M+1 rows instead of K+1, and the",
        "   stacked matrices hold M+1 models. The decoded replies themselves (K models) are what Flower's",
        "   Message API hands the strategy, so they stay; a deployment beyond memory needs streaming decode.",
        "   Its accuracy cost is in the 'Pre-selection' table and in the end-to-end run with M=5.",
        "",
        "Tried and not adopted:",
        "",
    ]
    for cell in raw["cells"]:
        own = cell.get("own_loss")
        if own:
            lines.append(f"- Own losses with `torch.func.vmap` over stacked weights instead of the loop "
                         f"({cell['model']}, {own['candidates']} candidates, 300 images): loop {own['loop']:.3f} s, "
                         f"vmap {own['vmap']:.3f} s. Not faster, so the loop stays (it runs once per round, "
                         "outside the steps).")
    lines += [
        "- Warm start of log_alpha from the previous round: not implemented, and not measured. Honest",
        "  candidates are new models every round, so which of them a unit favoured last round says little",
        "  about this round; and carrying trust across rounds gives an attacker who behaves for a few",
        "  rounds an open gate when it turns. The own-loss warm start (unchanged) already starts extreme",
        "  candidates closed. `soft_merge(initial_log_alpha=...)` remains for callers who want it.",
        "- A custom autograd function for the whole merge (one node instead of a few per unit): no",
        "  measurable gain per step on the digits MLP during development; the fixed cost is torch's",
        "  autograd engine and dispatch, not the number of nodes.",
        "",
    ]
    for cell in raw["cells"]:
        if cell["K"] != 100:
            continue
        rows = {r["strategy"]: r for r in cell["rows"]}
        krum, main, zero = rows["krum"], rows["softmerge"], rows["softmerge steps=0"]
        gram = 2 * cell["K"] ** 2 * cell["parameters"]
        per_step = seconds_per_step(main, zero)
        lines += [
            f"**Krum against SoftMerge at K=100 ({cell['model']}).** Krum's work is one Gram matrix of the",
            f"updates, 2 K^2 d = {gram / 1e9:.0f} GFLOP in one BLAS call, plus flattening: {krum['seconds']:.2f} s.",
            "SoftMerge without a single gate step (`steps=0`: screening, decoding, the scoring passes over the",
            "300 gate images, each candidate's own loss and, with the mirror test of the default, its mirror",
            f"image's (2K+1 forward passes), the final merge and its evaluation) already takes "
            f"{zero['seconds']:.2f} s ({zero['seconds'] / krum['seconds']:.1f}x Krum), and each of its "
            f"{main['steps']} steps {per_step * 1000:.0f} ms.",
            "Both parts are linear in K with large constants: a forward pass per candidate over the gate",
            "split (for the CNN, thousands of FLOP per parameter per image, against Krum's 2 K per parameter),",
            "and per step a read of the K+1 candidates (twice, with the gradient) plus the model's forward and",
            "backward pass. Krum's K^2 term overtakes them only at larger K. The target cannot be met at",
            "K=100 by this method without giving up gate steps or the scoring passes, which decide which",
            "candidates are gated out.", ""]
    cnn = sorted((c for c in raw["cells"] if c["model"] == "cnn"), key=lambda c: c["K"])
    ratios = []
    for cell in cnn:
        rows = {r["strategy"]: r for r in cell["rows"]}
        ratios.append((cell["K"], rows["softmerge"]["seconds"] / rows["krum"]["seconds"]))
    if ratios:
        below = [K for K, ratio in ratios if ratio <= 1]
        lines += ["**Where SoftMerge overtakes Krum (SmallCNN).** SoftMerge's time over Krum's: "
                  + ", ".join(f"K={K} {ratio:.2f}x" for K, ratio in ratios) + ". "
                  + (f"SoftMerge is the faster of the two from K={below[0]} on." if below else
                     f"Krum is still faster at K={ratios[-1][0]}."), ""]
    return lines


def render(raw: dict, args: argparse.Namespace) -> None:
    clock = raw.get("clock", "wall")
    bw = {int(threads): value for threads, value in raw["bandwidth"][clock].items()}
    for cell in raw["cells"]:
        cell["forward_backward_seconds"] = cell[f"forward_backward_{clock}"]
        for row in cell["rows"]:
            row["seconds"] = row[f"{clock}_seconds"]
    summary = write_report(Path(args.out), raw["machine"], bw, raw["cells"], raw["e2e"], raw["command"],
                           raw["elapsed"], raw["impl"], clock)
    lines = summary["lines"]
    info = raw["machine"]
    if "loadavg" in info:
        start, end = info["loadavg"], raw.get("loadavg_end", info["loadavg"])
        limits = ("every strategy limited to " + str(raw["threads"]) + " thread(s) (torch, OpenMP, BLAS)"
                  if raw.get("threads") else "default thread counts")
        conditions = (f"- Conditions: niceness {info['nice']}; {limits}"
                      f"; load average (1/5/15 min) {start[0]:.1f}/{start[1]:.1f}/{start[2]:.1f} at the start, "
                      f"{end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f} at the end.")
        if max(start[1], end[1]) > 0.7:
            conditions += (" A load above 1 here can be this command's own simulations (with `--accuracy` they"
                           " run just before the timings, the end-to-end runs at the end) or other jobs on"
                           " this shared machine; every strategy ran under the same conditions, one after"
                           " another, and repeated configurations differ by up to about 15% between calls.")
        lines.insert(lines.index("## Method") - 1, conditions)
    accuracy_note, accuracy_met = "see the test accuracy columns of the tables", "see the tables"
    if Path(args.accuracy_json).exists():
        data = json.loads(Path(args.accuracy_json).read_text())
        lines += accuracy_section(data)
        b_final, a_final, b_last, a_last = data["summary"]
        accuracy_note = (f"digits simulations of {data['date']}, means over {len(data['after'])} runs: final accuracy "
                         f"{b_final:.3f} before, {a_final:.3f} after; last 5 rounds {b_last:.3f} before, "
                         f"{a_last:.3f} after (section 'Accuracy before and after')")
        # One point is about one standard error of an accuracy on 360 test images.
        accuracy_met = "met" if a_final >= b_final - 0.01 and a_last >= b_last - 0.01 else "not met"
    pairs = []
    for cell in raw["cells"]:
        rows = {r["strategy"]: r for r in cell["rows"]}
        if "softmerge (before)" in rows:
            pairs.append((cell["model"], cell["K"], rows["softmerge (before)"]["accuracy"],
                          rows["softmerge"]["accuracy"]))
    if pairs:
        worst = min(pairs, key=lambda p: p[3] - p[2])
        accuracy_note += (f"; synthetic cells (2,000 test images), worst change after - before: {worst[0]} "
                          f"K={worst[1]} {worst[2]:.3f} -> {worst[3]:.3f}")
        # One point is about one standard error of an accuracy on 2,000 test images.
        if worst[3] < worst[2] - 0.01:
            accuracy_met = "not met"
    insert_at = lines.index("## Method")
    lines[insert_at:insert_at] = targets_section(summary, accuracy_note, accuracy_met)
    lines += discussion(raw)
    if args.notes and Path(args.notes).exists():
        lines += ["", Path(args.notes).read_text().rstrip(), ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
