"""Offline replica of the reference grid's setting, for trying soft-merge variants quickly.

The grid (docs/benchmarks.md) runs every cell through Flower's simulation engine, 3–4
minutes a cell. This script trains the same clients the same way (same partitions, and the
ClientApp's own local seeds and train/held-out cut) in one process without Flower, and
merges with FedAvg, the oracle or the soft merge, so a merge variant can be compared over
a few seeds and rounds in about a minute a run. Its FedAvg reproduces the grid's FedAvg
cells; the soft merge differs from the grid's only in its gate noise.

Two uses:

    # final and last-3 mean test accuracy of variants, over seeds
    python benchmarks/replica.py --attack sign-flip --seeds 0,1,2 --rounds 8 \\
        --variant default --variant warm_start_ceiling=true --variant fedavg --variant oracle

    # per round: does gate learning fit the gate split at the test split's expense?
    python benchmarks/replica.py --attack sign-flip --seeds 0 --rounds 8 --diagnose

    # every 5 rounds: which per-candidate score tells honest from malicious?
    python benchmarks/replica.py --attack ipm-0.1 --seeds 0 --rounds 15 --scores 5

    # every round: do the open malicious updates pull against the rest of the merge?
    python benchmarks/replica.py --attack sign-flip --seeds 0 --rounds 30 --cosines

    # every 5 rounds: how alike are honest clients, and jittered copies, on the gate split?
    python benchmarks/replica.py --attack mimic-jitter --seeds 0 --rounds 30 --loss-distances 5 --variant fedavg

    # every round: is the merge better without an open client, on the test split and on the gate split?
    python benchmarks/replica.py --attack sign-flip --seeds 1 --rounds 30 --marginal

    # every round: each client's discounted record of cross-fitted harm (gates learned on one half
    # of the gate split, the client's harm scored on the other), and the merge without clients Z
    # standard errors harmful (an experiment, dropped: docs/benchmarks.md, "Session 25")
    python benchmarks/replica.py --attack sign-flip --seeds 1 --rounds 30 --crossfit 2

    # every round: which step shuts clients out (warm start, mirror bound, gate learning)?
    python benchmarks/replica.py --attack none --seeds 0 --rounds 12 --selection --variant example_weights=true

    # a sleeper: the malicious clients train honestly for 10 rounds, building a gate record, then flip
    python benchmarks/replica.py --attack sign-flip --seeds 0 --rounds 30 --attack-from 11 --variant mirror_trusted=0.6

    # Sybils: the malicious clients come back under a new identity every round (no gate record)
    python benchmarks/replica.py --attack sign-flip --seeds 0 --rounds 30 --fresh-ids --variant mirror_trusted=0.5

    # softmerge-warm-step = auto against attackers who choose its step: 4 of the 8 malicious clients
    # send their honest update stretched 6x, which raises the round's bend, and the other 4 flip
    python benchmarks/replica.py --attack sign-flip --alpha 0.5 --seeds 1 --rounds 30 --bend-raisers 4 \\
        --raise-scale 6 --variant default --variant 'warm_start_step="auto"'

Attacks: ``none``, the client-side ``sign-flip``, ``label-flip``, ``backdoor``, ``gaussian`` and
``layer-stealth`` (as the ClientApp makes them), and the colluding
attacks of :mod:`softmerge.simulations.colluding` (``alie``, ``ipm-0.1``, ``fang``, ..., and
the jittered ``min-sum-jitter``, ...),
crafted from the honest updates with the harness's seed, as the grid does.

``--diagnose`` scores three merges of the same round's candidates on the gate split and
on the test split: the learned gates, the learned gates with the malicious candidates'
weights set to 0 (and the rest renormalised), and the warm start alone (no gate step).
The trajectory follows the learned merge. ``--scores N`` prints, every N rounds,
per-candidate scores on the gate split, relative to the keep model and sorted, for honest
and malicious candidates apart: the own loss, the mirror difference L(keep + delta) -
L(keep - delta) that ``SoftMergeConfig.mirror_test`` uses (and its z, d over its standard
error), the linear term grad L(keep) . delta, and the own loss, d and z again at the step an
update takes inside an even merge of the K candidates (keep + delta / K, loss changes times K),
then each update's own loss beside its merge-step own loss and its bend (the mean rise of the
update and its mirror image), sorted by the first, and the bend's quantiles.
A variant is ``default``, ``fedavg``,
``oracle`` (FedAvg over the honest clients), ``fltrust`` (the grid's FLTrust: the server
model takes the median client's SGD steps on the gate split), ``fltrust-one-pass`` (one pass
over the gate split instead), or ``+``-joined SoftMergeConfig overrides
such as ``warm_start_temperature=0.5+warm_start_ceiling=true``. The soft merge keeps each
client's gate record as the strategy does (trust over rounds, its default since session 19);
``trust=false`` joined in turns that off. ``post=uniform``,
``post=examples`` or ``post=examples-capped`` joined in uses the learned gates only to
select (gate > 0.5) and then merges the selected clients with equal or example-count
weights (capped: no count above the selected clients' median, the rule of
``example_weights=true``, which runs it inside the merge). ``--inflate F`` makes the
malicious clients claim F times the largest honest count. ``post=zero-malicious``
is for analysis only: it sets the malicious candidates' learned weights to 0 (perfect
detection), which splits a gap to the oracle into detection and honest weighting.
``post=uninformed-median`` or ``post=uninformed-mean`` (an experiment, session 36) replaces
the merge of a round that stood uninformed (no start beat the gate split's label
frequencies, nor did the global model) by every client's coordinate-wise median or
example-weighted mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys

import numpy as np
import torch

from softmerge.aggregation import SoftMergeConfig, soft_merge
from softmerge.aggregation.trust import relative_openness, trust_of, update_record
from softmerge.aggregation.robust import apply_update, fltrust, fltrust_server_model, flatten_updates
from softmerge.aggregation.candidates import running_statistics
from softmerge.aggregation.merge import (DIRECTION_START, build_merge_units, evaluate_state, example_count_weights,
                                         loss_rms, merge_step_losses, mirror_statistics, per_example_losses)
from softmerge.client.app import local_seed, split_held_out
from softmerge.client.attacks import flip_labels, poison_state
from softmerge.simulations.colluding import (DEFAULT_MIMIC_WARMUP, FixedMimic, craft_malicious_updates,
                                              is_colluding_attack, parse_attack_name)
from softmerge.simulations.tasks import (ArraySet, attack_success_rate, build_model, evaluate_model, load_partition,
                                         load_task, poison_with_backdoor, train_model)

DATASET = "fashion-mnist"
# The reference grid's settings (benchmarks/reference_grid.sh).
CLIENTS, ALPHA, GATE_SIZE, TEST_SIZE, POOL = 20, 0.5, 300, 2000, 12000
LOCAL_LR, LOCAL_BATCH = 0.05, 32
# The strategy's default memory of a client's gate record (SoftMerge(trust_memory=...)).
TRUST_MEMORY = 0.9
REPLICA_CLIENT_ATTACKS = ("none", "sign-flip", "label-flip", "backdoor", "gaussian", "layer-stealth")
# The grid's noise (run-config gaussian-std) and layer-stealth's boost (attack-scale 0: the n replies averaged).
GAUSSIAN_STD, LAYER_STEALTH_SCALE = 1.0, float(CLIENTS)
# The grid's backdoor (run-config defaults): trigger on half a malicious client's data, target class 0.
BACKDOOR_TARGET, BACKDOOR_FRACTION = 0, 0.5


POST_MERGES = ("uniform", "examples", "examples-capped", "zero-malicious", "uninformed-median", "uninformed-mean")


def parse_variant(text: str) -> tuple[SoftMergeConfig | str, str | None, bool]:
    """(config or baseline name, post-merge rule or None, trust over rounds on)."""
    if text in ("fedavg", "oracle", "fltrust", "fltrust-one-pass"):
        return text, None, False
    overrides: dict[str, object] = {}
    post, trust = None, True
    if text != "default":
        types = {f.name: f.type for f in dataclasses.fields(SoftMergeConfig)}
        for item in text.split("+"):
            key, _, raw = item.partition("=")
            if key == "post":
                if raw not in POST_MERGES:
                    raise SystemExit(f"post must be one of {POST_MERGES}")
                post = raw
                continue
            if key == "trust":
                trust = raw.lower() == "true"
                continue
            if key not in types:
                raise SystemExit(f"unknown SoftMergeConfig field {key!r}")
            overrides[key] = raw.lower() == "true" if types[key] == "bool" else json.loads(raw)
    return SoftMergeConfig(**overrides), post, trust


def post_merge_weights(report, sizes, rule):
    """Gates used only to select (gate > 0.5), then a plain or example-weighted mean of the selected clients.

    A unit where no client is selected keeps the old model.
    """
    gates = np.array(report.gates)
    keep = report.candidates.index("keep") if "keep" in report.candidates else None
    prior = np.array([sizes[int(label.split("-")[1])] if label.startswith("client-") else 0.0
                      for label in report.candidates])
    weights = np.zeros_like(gates)
    weights[:, keep] = 1.0
    if rule == "examples-capped":
        # The merge's own rule, with the keep model never selected.
        client_gates = np.where(prior > 0, gates, 0.0)
        return example_count_weights(torch.from_numpy(client_gates), torch.from_numpy(prior),
                                     torch.from_numpy(weights)).numpy()
    for u in range(gates.shape[0]):
        chosen = (gates[u] > 0.5) & (prior > 0)
        if chosen.any():
            mass = np.where(chosen, 1.0 if rule == "uniform" else prior, 0.0)
            weights[u] = mass / mass.sum()
    return weights


def uninformed_merge(candidates, global_state, sizes, rule, units):
    """Every client's reply merged by coordinate-wise (lower) median or example-weighted mean."""
    if rule == "uninformed-mean":
        share = sizes / sizes.sum()
        return weighted_state(candidates, [share] * len(units), units)
    return {name: (torch.stack([c[name] for c in candidates]).median(dim=0).values
                   if tensor.dtype.is_floating_point else tensor)
            for name, tensor in global_state.items()}


def client_candidates(global_state, partitions, malicious, attack, round_number, seed, tracker=None, raisers=(),
                      raise_scale=3.0):
    """Every client's reply; ``raisers`` (malicious clients too) send global + ``raise_scale`` x their honest update,
    the other malicious clients the attack."""
    candidates = []
    malicious = set(malicious) - set(raisers)
    for pid, data in enumerate(partitions):
        train_set, _ = split_held_out(data)
        if pid in malicious and attack == "label-flip":
            train_set = ArraySet(train_set.x, flip_labels(train_set.y, 10))
        client_seed = local_seed(seed, round_number, pid)
        if pid in malicious and attack == "backdoor":
            train_set = poison_with_backdoor(train_set, BACKDOOR_TARGET, BACKDOOR_FRACTION, client_seed)
        model = build_model(DATASET)
        model.load_state_dict(global_state)
        torch.manual_seed(client_seed)
        train_model(model, train_set, epochs=1, learning_rate=LOCAL_LR, batch_size=LOCAL_BATCH, seed=client_seed)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if pid in raisers:
            # An update in the honest direction, stretched: it overshoots at its own step, bends
            # the gate-split loss by nats (so softmerge-warm-step = auto takes the merge step),
            # and descends at a twentieth of it.
            state = {k: global_state[k] + raise_scale * (v - global_state[k]) if v.dtype.is_floating_point else v
                     for k, v in state.items()}
        elif pid in malicious and attack in ("sign-flip", "gaussian", "layer-stealth"):
            # As the ClientApp does, with its generator and the model's running statistics left alone.
            state = poison_state(attack, global_state, state, scale=LAYER_STEALTH_SCALE, std=GAUSSIAN_STD,
                                 generator=torch.Generator().manual_seed(client_seed),
                                 statistics=running_statistics(model))
        candidates.append(state)
    if attack not in REPLICA_CLIENT_ATTACKS and malicious:
        collude(candidates, global_state, malicious, attack, round_number, seed, tracker)
    return candidates


def collude(candidates, global_state, malicious, attack, round_number, seed, tracker=None):
    """Replace the malicious candidates by global + crafted update, as the grid's harness does.

    ``tracker``: mimic-fixed's :class:`FixedMimic`, the same object every round of a run.
    """
    keys = [k for k, v in global_state.items() if v.dtype.is_floating_point]
    def flat_update(state):
        return np.concatenate([(state[k] - global_state[k]).reshape(-1).double().numpy() for k in keys])
    honest = [p for p in range(len(candidates)) if p not in malicious]
    tracking = {} if tracker is None else {"tracker": tracker, "labels": honest}
    crafted = craft_malicious_updates(attack, np.stack([flat_update(candidates[p]) for p in honest]),
                                      len(malicious), len(candidates), rng=np.random.default_rng([seed, round_number]),
                                      **tracking)
    for pid, update in zip(sorted(malicious), crafted):
        state, offset = dict(candidates[pid]), 0
        for k in keys:
            size = global_state[k].numel()
            piece = torch.from_numpy(update[offset:offset + size]).reshape(global_state[k].shape)
            state[k] = (global_state[k].double() + piece).to(global_state[k].dtype)
            offset += size
        candidates[pid] = state


def without_malicious(weights, malicious):
    """Mixing weights (U, K) with the malicious candidates' columns set to 0 and each row renormalised."""
    cleaned = weights.copy()
    cleaned[:, sorted(malicious)] = 0.0
    return cleaned / np.maximum(cleaned.sum(axis=1, keepdims=True), 1e-12)


def weighted_state(states, weights_per_unit, units):
    """sum_k w_uk * theta_uk per unit; integer buffers from the first state."""
    merged = {}
    for u, unit in enumerate(units):
        for name in unit.tensor_names:
            if states[0][name].dtype.is_floating_point:
                merged[name] = sum(float(weights_per_unit[u][k]) * states[k][name] for k in range(len(states)))
            else:
                merged[name] = states[0][name]
    return merged


def score(state, data):
    model = build_model(DATASET)
    model.load_state_dict(state)
    return evaluate_model(model, data)


def crossfit_harm(model, candidates, global_state, gate, config, labels, sizes, trust, recorded, units, seed):
    """Per client, the per-example harm of its gate measured on data the gates were not learned on.

    The gate split is cut in two halves; gates are learned on each half (as the merge learns
    them on the whole), and each open client's harm is scored on the other half: the loss of
    that merge minus the loss of the same merge with the client's gate closed (the rest
    renormalised). Returns {client index: per-example differences} for clients open in a half.
    """
    inputs, targets = gate
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    halves = [order[: len(order) // 2], order[len(order) // 2:]]
    states = candidates + [global_state]
    found: dict[int, list[torch.Tensor]] = {}
    for learn, score in (halves, halves[::-1]):
        _, report = soft_merge(model, candidates, (inputs[learn], targets[learn]), config, labels=labels,
                               examples=sizes, trust=trust, recorded=recorded)
        harms = marginal_harms(model, states, np.array(report.weights), units, inputs[score], targets[score])
        for k, harm in harms.items():
            found.setdefault(k, []).append(harm)
    return {k: torch.cat(parts) for k, parts in found.items()}


def update_harm_record(record, harms, clients):
    """Discount every client's (sum, sum of squares, count) of per-example harm and add this
    round's; returns each client's mean harm in standard errors (> 0: harmful)."""
    scores = {}
    for k in range(clients):
        total, squares, count = (TRUST_MEMORY * v for v in record.get(k, (0.0, 0.0, 0.0)))
        if k in harms:
            total, squares, count = (total + float(harms[k].sum()), squares + float((harms[k] ** 2).sum()),
                                     count + len(harms[k]))
        record[k] = (total, squares, count)
        if count >= 2:
            mean = total / count
            scores[k] = mean / (max(squares / count - mean ** 2, 1e-12) ** 0.5 / count ** 0.5)
    return scores


def format_scores(scores, clients):
    return " ".join(f"{scores[k]:+.1f}" for k in sorted(clients, key=scores.get)) or "-"


def run(variant, attack, seed, rounds, malicious, diagnose=False, post=None, scores_every=0, cosines=False,
        inflate=0.0, selection=False, distances_every=0, trust=True, attack_from=1, marginal=False,
        crossfit=None, alpha=ALPHA, fresh_ids=False, raisers=0, raise_scale=3.0):
    task = load_task(DATASET, GATE_SIZE, TEST_SIZE, seed, "", POOL)
    model = build_model(DATASET, seed)
    # The units the gates were learned over, so that post-merge rules reweigh the same ones.
    units = build_merge_units(model, variant.units if isinstance(variant, SoftMergeConfig) else "layer")
    partitions = [load_partition(DATASET, p, CLIENTS, partitioning="dirichlet", alpha=alpha, gate_size=GATE_SIZE,
                                 test_size=TEST_SIZE, seed=seed, pool_size=POOL) for p in range(CLIENTS)]
    sizes = np.array([len(split_held_out(d)[0]) for d in partitions], dtype=float)
    malicious = set(malicious) if attack != "none" else set()
    if inflate:
        # The counts the malicious clients claim: the largest honest count times ``inflate``.
        sizes[sorted(malicious)] = inflate * sizes.max()
    labels = [f"client-{p}" for p in range(CLIENTS)]
    kind, implied = parse_attack_name(attack) if is_colluding_attack(attack) else (attack, {})
    tracker = FixedMimic(implied.get("warmup", DEFAULT_MIMIC_WARMUP)) if kind == "mimic-fixed" else None
    accuracies, malicious_weight = [], []
    record: dict[str, tuple[float, float]] = {}
    harm_record: dict[int, tuple[float, float, float]] = {}
    for round_number in range(1, rounds + 1):
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        # A sleeper's malicious clients train honestly until ``attack_from``, building a record.
        attacking = malicious if round_number >= attack_from else set()
        if fresh_ids:
            # Sybils: each malicious client comes back under a new identity every round, so it
            # never has a gate record (as a SuperNode re-registering for a new node ID).
            labels = [f"sybil-{p}-round-{round_number}" if p in malicious else f"client-{p}" for p in range(CLIENTS)]
        candidates = client_candidates(global_state, partitions, attacking, attack, round_number, seed, tracker,
                                       raisers=sorted(attacking)[:raisers], raise_scale=raise_scale)
        if scores_every and (round_number == 1 or round_number % scores_every == 0):
            print_scores(round_number, model, global_state, candidates, malicious, task)
        if distances_every and (round_number == 1 or round_number % distances_every == 0):
            print_loss_distances(round_number, model, global_state, candidates, malicious, task)
        if isinstance(variant, str) and variant.startswith("fltrust"):
            # As the grid's FLTrust: the server model trains on the gate split the way clients
            # train, for as many steps as the median client (or one pass).
            steps = None if variant == "fltrust-one-pass" else math.ceil(statistics.median(sizes) / LOCAL_BATCH)
            server_state, _ = fltrust_server_model(model, global_state, task.gate.tensors(), steps=steps,
                                                   learning_rate=LOCAL_LR, batch_size=LOCAL_BATCH, momentum=0.9,
                                                   seed=seed + round_number)
            names, updates = flatten_updates(global_state, candidates + [server_state])
            result = fltrust(updates[:-1], updates[-1])
            merged = apply_update(global_state, result.aggregate, names)
            trust = result.trust_scores
            malicious_weight.append(float(trust[sorted(malicious)].sum() / trust.sum()) if malicious and trust.sum() > 0
                                    else 0.0)
        elif isinstance(variant, str):
            members = [p for p in range(CLIENTS) if variant == "fedavg" or p not in malicious]
            share = sizes[members] / sizes[members].sum()
            merged = {k: (sum(float(w) * candidates[p][k] for w, p in zip(share, members))
                          if v.dtype.is_floating_point else v) for k, v in global_state.items()}
            malicious_weight.append(float(sizes[list(malicious)].sum() / sizes.sum()) if variant == "fedavg" else 0.0)
        else:
            # As the strategy: the round's seed, and (by default) each client's gate record as trust.
            round_trust = [trust_of(record, label) for label in labels] if trust else None
            round_recorded = [label in record for label in labels] if trust else None
            merged, report = soft_merge(model, candidates, task.gate.tensors(),
                                       dataclasses.replace(variant, seed=variant.seed + round_number), labels=labels,
                                       examples=sizes, trust=round_trust, recorded=round_recorded)
            if report.bend is not None:
                # softmerge-warm-step = auto: which step this round's warm start scored at.
                print(f"round {round_number} bend {report.bend:.2f}: scored at the "
                      f"{'merge' if report.merge_step else 'own'} step", flush=True)
            if trust and report.rejected_loss is None:
                columns = [k for k, label in enumerate(report.candidates) if label in labels]
                record = update_record(record, [report.candidates[k] for k in columns],
                                       relative_openness(report.gates, columns), TRUST_MEMORY)
            malicious_weight.append(report.weight_on([labels[p] for p in malicious]))
            if crossfit is not None:
                harms = crossfit_harm(model, candidates, global_state, task.gate.tensors(),
                                      dataclasses.replace(variant, seed=variant.seed + round_number), labels, sizes,
                                      round_trust, round_recorded, units, seed * 1000 + round_number)
                scores = update_harm_record(harm_record, harms, CLIENTS)
                flagged = {k for k, z in scores.items() if z > crossfit}
                print(f"round {round_number} crossfit harm z: honest "
                      f"{format_scores(scores, [k for k in scores if k not in malicious])} | malicious "
                      f"{format_scores(scores, [k for k in scores if k in malicious])}; closed "
                      f"{len(flagged - malicious)} honest, {len(flagged & malicious)} malicious", flush=True)
                if flagged:
                    weights = without_malicious(np.array(report.weights), flagged)
                    merged = weighted_state(candidates + [global_state], weights, units)
                    malicious_weight[-1] = float(weights[:, sorted(malicious)].sum(axis=1).mean()) if malicious else 0.0
            if post == "zero-malicious":
                # Analysis only: the learned weights with perfect detection, to split the gap to
                # the oracle into what detection costs and what the honest weighting costs.
                weights = without_malicious(np.array(report.weights), malicious)
                merged = weighted_state(candidates + [global_state], weights, units)
                malicious_weight[-1] = 0.0
            elif post in ("uninformed-median", "uninformed-mean"):
                # A round whose merge stood uninformed (nothing beat the label frequencies):
                # every client's reply, by coordinate-wise median or example-weighted mean,
                # instead of the gates' first start.
                if report.uninformed:
                    merged = uninformed_merge(candidates, global_state, sizes, post, units)
                    malicious_weight[-1] = (len(malicious) / len(candidates) if post == "uninformed-median"
                                            else float(sizes[sorted(malicious)].sum() / sizes.sum()))
            elif post is not None:
                weights = post_merge_weights(report, sizes, post)
                merged = weighted_state(candidates + [global_state], weights, units)
                malicious_weight[-1] = float(weights[:, sorted(malicious)].sum(axis=1).mean()) if malicious else 0.0
            if cosines:
                print_cosines(round_number, report, global_state, candidates, malicious)
            if marginal:
                print_marginal(round_number, model, report, candidates + [global_state], units, malicious, task)
            if selection:
                print_selection(round_number, model, candidates, task, variant, labels, sizes, report, malicious)
            if diagnose:
                diagnose_round(round_number, report, candidates + [global_state], units, malicious, task,
                               soft_merge(model, candidates, task.gate.tensors(),
                                          dataclasses.replace(variant, steps=0), labels=labels)[1])
        model.load_state_dict(merged)
        accuracies.append(evaluate_model(model, task.test)[1])
    if attack == "backdoor":
        print(f"backdoor attack success rate after round {rounds}: "
              f"{attack_success_rate(model, task.test, BACKDOOR_TARGET):.4f}", flush=True)
    return accuracies, malicious_weight


def print_loss_distances(round_number, model, global_state, candidates, malicious, task):
    """The near-duplicate test's ratio, rms(l_a - l_b) / min(rms(l_a - l_keep), rms(l_b - l_keep)) over
    per-example gate-split losses, for pairs of honest clients and pairs of malicious ones: the
    smallest honest ratio is where a tolerance would start to group honest clients."""
    inputs, targets = task.gate.tensors()
    keep = per_example_losses(model, global_state, inputs, targets)
    losses = [per_example_losses(model, state, inputs, targets) for state in candidates]
    moved = [loss_rms(loss - keep) for loss in losses]

    def ratios(clients):
        # A client that did not move has no scale: the merge never groups it (inf here).
        return [loss_rms(losses[a] - losses[b]) / min(moved[a], moved[b])
                if min(moved[a], moved[b]) > 0 else math.inf for i, a in enumerate(clients) for b in clients[:i]]

    honest = ratios([p for p in range(len(candidates)) if p not in malicious])
    attackers = ratios(sorted(malicious))
    show = lambda values: (f"min {min(values):.3f} median {statistics.median(values):.3f} max {max(values):.3f}"  # noqa: E731
                           if values else "-")
    print(f"round {round_number} loss-distance ratio: honest pairs {show(honest)} | malicious pairs {show(attackers)}",
          flush=True)


def print_cosines(round_number, report, global_state, candidates, malicious):
    """Each open client's update against the rest of the merge's: does an open malicious one pull the other way?"""
    updates = flatten_updates(global_state, candidates)[1].numpy()
    # Mean over units of each client's weight; the keep column adds no update.
    weights = np.array(report.weights).mean(axis=0)[:len(candidates)]
    total = weights @ updates
    found = {True: [], False: []}
    for k, weight in enumerate(weights):
        if weight > 0:
            rest = total - weight * updates[k]
            found[k in malicious].append(float(updates[k] @ rest / (np.linalg.norm(updates[k]) * np.linalg.norm(rest)
                                                                    + 1e-12)))
    show = lambda values: " ".join(f"{v:+.2f}" for v in values) or "-"  # noqa: E731
    print(f"round {round_number} cosine with the rest of the merge: open honest {show(found[False])} | "
          f"open malicious {show(found[True])}", flush=True)


def merged_openness(report):
    """Per unit and candidate, positive where the round's merge has the candidate open.

    The learned log_alpha, except in a round merged by the update directions, whose
    log_alpha is the attempt it replaced: there the merge's own gates (1 or 0) decide.
    """
    if report.start == DIRECTION_START:
        return [[1.0 if gate > 0 else -1.0 for gate in row] for row in report.gates]
    return report.log_alpha


def print_selection(round_number, model, candidates, task, variant, labels, sizes, report, malicious):
    """How many honest and malicious clients have log_alpha > 0 (gate above 1/2) in some merge
    unit: at the own-loss start, with the mirror test's bound added, and after gate learning
    (the round's merge; in a round merged by the update directions, the clients it weights)."""
    def opened(log_alpha, clients):
        return sum(1 for p in clients if any(row[p] > 0 for row in log_alpha))

    gate = task.gate.tensors()
    starts = [soft_merge(model, candidates, gate, dataclasses.replace(variant, steps=0, mirror_test=mirror),
                         labels=labels, examples=sizes)[1].log_alpha for mirror in (False, True)]
    honest = [p for p in range(len(candidates)) if p not in malicious]
    parts = []
    for name, clients in (("honest", honest), ("malicious", sorted(malicious))):
        if clients:
            counts = [opened(log_alpha, clients) for log_alpha in starts + [merged_openness(report)]]
            parts.append(f"{name} {counts[0]} -> {counts[1]} -> {counts[2]} of {len(clients)}")
    print(f"round {round_number} open (own-loss start -> + mirror bound -> learned): " + " | ".join(parts),
          flush=True)


def print_scores(round_number, model, global_state, candidates, malicious, task):
    inputs, targets = task.gate.tensors()
    was_training = model.training
    model.eval()
    keep_loss = evaluate_state(model, global_state, inputs, targets)[0]
    own_losses = [per_example_losses(model, c, inputs, targets) for c in candidates]
    own = np.array([float(losses.mean()) for losses in own_losses]) - keep_loss
    statistics_of = [mirror_statistics(model, c, global_state, inputs, targets, own_losses=losses)
                     for c, losses in zip(candidates, own_losses)]
    mirror = np.array([loss for loss, _ in statistics_of]) - keep_loss
    errors = np.array([error for _, error in statistics_of])
    floats = [k for k, v in global_state.items() if v.dtype.is_floating_point]
    params = {k: global_state[k].clone().requires_grad_(True) for k in floats}
    logits = torch.func.functional_call(model, {**global_state, **params}, (inputs,))
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets), [params[k] for k in floats])
    linear = np.array([sum(float((g * (c[k] - global_state[k])).sum()) for g, k in zip(grads, floats))
                       for c in candidates])
    # Each update at the step it takes inside an even merge of all K of them, scored as
    # softmerge-warm-step = merge scores it (loss changes times K).
    keep_losses = per_example_losses(model, global_state, inputs, targets)
    stepped = [merge_step_losses(model, c, global_state, keep_losses, inputs, targets, len(candidates))
               for c in candidates]
    scaled_own = np.array([float(losses.mean()) for losses, _ in stepped]) - keep_loss
    scaled_statistics = [mirror_statistics(model, c, global_state, inputs, targets, own_losses=losses,
                                           reflected_losses=reflected)
                         for c, (losses, reflected) in zip(candidates, stepped)]
    scaled_mirror = np.array([loss for loss, _ in scaled_statistics]) - keep_loss
    scaled_errors = np.array([error for _, error in scaled_statistics])
    model.train(was_training)
    honest = [p for p in range(len(candidates)) if p not in malicious]
    bad = sorted(malicious)

    def row(values):
        return "[" + " ".join(f"{v:+.2f}" for v in sorted(values)) + "]"
    print(f"round {round_number}: keep loss {keep_loss:.3f}", flush=True)
    # The mirror test bounds a candidate whose z (d over its standard error) exceeds mirror_confidence.
    for name, values in (("own loss", own), ("mirror d", own - mirror), ("mirror z", (own - mirror) / errors),
                         ("linear", linear), ("1/K own", scaled_own), ("1/K d", scaled_own - scaled_mirror),
                         ("1/K z", (scaled_own - scaled_mirror) / scaled_errors)):
        print(f"  {name:9s} honest {row(values[honest])}  malicious {row(values[bad]) if bad else '-'}", flush=True)

    # Which updates rise at their own step but fall at the merge step: honest specialists do
    # under strong heterogeneity, and an attacker can fake it. The bend, the mean rise of the
    # update and its mirror image (aggregation.merge.update_bend), is the same for an update and its
    # sign flip to second order; ``own`` and ``mirror`` are already rises over the keep model's loss.
    bend = (own + mirror) / 2

    def pairs(clients):
        return "[" + " ".join(f"{own[p]:+.2f}/{scaled_own[p]:+.2f}/{bend[p]:.2f}"
                              for p in sorted(clients, key=lambda p: own[p])) + "]"
    print(f"  own/(1/K)/bend honest {pairs(honest)}  malicious {pairs(bad) if bad else '-'}", flush=True)
    quantiles = np.quantile(bend, [0.5, 0.75, 0.9])
    print(f"  bend quantiles 50/75/90%: all {' '.join(f'{q:.2f}' for q in quantiles)}; honest "
          f"{' '.join(f'{q:.2f}' for q in np.quantile(bend[honest], [0.5, 0.75, 0.9]))}", flush=True)


def diagnose_round(round_number, report, states, units, malicious, task, warm_report):
    learned = np.array(report.weights)
    cleaned = without_malicious(learned, malicious)
    cells = []
    for name, weights in (("learned", learned), ("malicious zeroed", cleaned),
                          ("warm start", np.array(warm_report.weights))):
        gate_loss, gate_acc = score(weighted_state(states, weights, units), task.gate)
        test_loss, test_acc = score(weighted_state(states, weights, units), task.test)
        on_malicious = weights[:, sorted(malicious)].sum(axis=1).mean() if malicious else 0.0
        cells.append(f"{name}: gate {gate_loss:.3f}/{gate_acc:.3f} test {test_loss:.3f}/{test_acc:.3f} "
                     f"w_mal {on_malicious:.2f}")
    print(f"round {round_number} steps {report.steps} | " + " | ".join(cells), flush=True)


def marginal_harms(model, states, weights, units, inputs, targets):
    """Per open client k (every state but the last, the keep model): the per-example loss of the
    merge with ``weights`` minus that of the same merge with k's gate closed (the others
    renormalised); > 0 where the merge is better without k."""
    was_training = model.training
    model.eval()
    base = per_example_losses(model, weighted_state(states, weights, units), inputs, targets)
    harms = {k: base - per_example_losses(model, weighted_state(states, without_malicious(weights, {k}), units),
                                          inputs, targets)
             for k in range(len(states) - 1) if weights[:, k].max() > 0}
    model.train(was_training)
    return harms


def print_marginal(round_number, model, report, states, units, malicious, task):
    """Each open client's marginal harm: the mean loss of the merge minus that of the merge with
    the client's gate closed (the others renormalised), in millinats, on the test split and on
    the gate split; > 0 means the merge is better without it."""
    weights = np.array(report.weights)
    found = {}
    for name, data in (("test", task.test.tensors()), ("gate", task.gate.tensors())):
        harms = marginal_harms(model, states, weights, units, *data)
        found[name] = {bad: [1000 * float(harm.mean()) for k, harm in harms.items() if (k in malicious) == bad]
                       for bad in (True, False)}
    show = lambda values: " ".join(f"{v:+.0f}" for v in sorted(values)) or "-"  # noqa: E731
    print(f"round {round_number} marginal harm (millinats), test: honest {show(found['test'][False])} | "
          f"malicious {show(found['test'][True])}; gate: honest {show(found['gate'][False])} | "
          f"malicious {show(found['gate'][True])}", flush=True)


def replica_attack(name: str) -> str:
    if name in REPLICA_CLIENT_ATTACKS or is_colluding_attack(name):
        return name
    raise argparse.ArgumentTypeError(f"{name!r} is neither {', '.join(REPLICA_CLIENT_ATTACKS)} nor a colluding attack")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", type=replica_attack, default="none",
                        help=f"{', '.join(REPLICA_CLIENT_ATTACKS)} or a colluding attack (alie, mimic-jitter, ...)")
    parser.add_argument("--variant", action="append", default=None)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--malicious", default="0,1,2,3,4,5,6,7", help="partition ids (the grid's 40%%)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="Dirichlet alpha of the partitions")
    parser.add_argument("--diagnose", action="store_true")
    parser.add_argument("--scores", type=int, default=0, metavar="N",
                        help="every N rounds, print per-candidate detection scores "
                             "(own loss, mirror test, linear term)")
    parser.add_argument("--inflate", type=float, default=0.0, metavar="F",
                        help="malicious clients claim F times the largest honest example count (weights only)")
    parser.add_argument("--cosines", action="store_true",
                        help="every round, each open client's update's cosine with the rest of the merged update")
    parser.add_argument("--selection", action="store_true",
                        help="every round, how many honest and malicious clients are open at the warm start, "
                             "with the mirror bound, and after gate learning")
    parser.add_argument("--loss-distances", type=int, default=0, metavar="N",
                        help="every N rounds, the near-duplicate test's ratio for honest pairs and malicious pairs")
    parser.add_argument("--attack-from", type=int, default=1, metavar="R",
                        help="the malicious clients train honestly before round R (a sleeper that builds a "
                             "gate record first)")
    parser.add_argument("--fresh-ids", action="store_true",
                        help="the malicious clients come back under a new identity every round (Sybils "
                             "with no gate record)")
    parser.add_argument("--bend-raisers", type=int, default=0, metavar="K",
                        help="K of the malicious clients send their honest update stretched (--raise-scale) "
                             "instead of the attack, to raise the round's bend (an attack on "
                             "softmerge-warm-step = auto)")
    parser.add_argument("--raise-scale", type=float, default=3.0, metavar="S",
                        help="the stretch of --bend-raisers' updates")
    parser.add_argument("--marginal", action="store_true",
                        help="every round, each open client's marginal harm to the merge on the test and gate splits")
    parser.add_argument("--crossfit", type=float, default=None, metavar="Z",
                        help="close a client whose discounted record of cross-fitted harm is Z standard errors "
                             "above 0 (an experiment)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    malicious = [int(p) for p in args.malicious.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",")]
    for text in args.variant or ["default"]:
        variant, post, trust = parse_variant(text)
        finals, last3 = [], []
        for seed in seeds:
            accuracies, weights = run(variant, args.attack, seed, args.rounds, malicious, args.diagnose, post,
                                      args.scores, args.cosines, args.inflate, args.selection, args.loss_distances,
                                      trust, args.attack_from, args.marginal, args.crossfit, args.alpha,
                                      args.fresh_ids, args.bend_raisers, args.raise_scale)
            finals.append(accuracies[-1])
            last3.append(statistics.mean(accuracies[-3:]))
            print(f"{text} {args.attack} seed {seed}: final {accuracies[-1]:.4f} last-3 {last3[-1]:.4f} "
                  f"malicious weight (last 3) {statistics.mean(weights[-3:]):.3f} "
                  f"rounds {[round(a, 3) for a in accuracies]}", flush=True)
        print(f"== {text} {args.attack} seeds {args.seeds}: final mean {statistics.mean(finals):.4f} "
              f"last-3 mean {statistics.mean(last3):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
