"""The ServerApp: builds task, model, strategy and evaluation from the run config.

The server's clean data is split into a *gate* split, which SoftMerge learns its gates
on, and a *test* split, which ``evaluate_fn`` reports accuracy on. The gates never see
the test split, for every strategy alike.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from flwr.supercore.run import RunNotRunningException

from ..aggregation.candidates import running_statistics
from ..simulations.colluding import is_colluding_attack
from ..simulations.config import (RunSettings, malicious_ids_outside, node_count_problem, parse_run_config,
                                 rule_replies, task_data, to_run_config)
from ..simulations.tasks import attack_success_rate, build_model, evaluate_model
from .checkpoint import (arrays_under, check_node_count, config_fingerprint, load_checkpoint, recorded_nodes,
                         restore_rng_state, save_checkpoint)
from .output_lock import output_lock
from .replies import decode_state
from .results import ResultsWriter, load_results_to_resume
from .strategies import build_strategy

app = ServerApp()

# The simulation adversary's round-to-round state (mimic-fixed's target) rides in the
# checkpoint's strategy arrays under this prefix, apart from the strategy's own.
ADVERSARY_PREFIX = "adversary/"
# How often a round waiting for replies looks at the stop signal, in seconds.
STOP_POLL_SECONDS = 0.1


class RunStopped(RuntimeError):
    """The run was stopped from outside (the simulation runtime ended) before it finished."""


class NoClientUpdates(RuntimeError):
    """Every round of the run ended without one client reply the strategy could use."""


def count_used_replies(strategy: FedAvg) -> dict[str, Any]:
    """Count, in place, the rounds ``strategy`` aggregates and the client replies it used in them.

    Also keeps, per round, how many nodes never replied (``replies-missing``).

    The strategies report the replies that went into the round's model as ``replies-used``
    (0 when every reply was excluded, or the rule skipped, raised or overflowed and the
    global model was kept, or SoftMerge gave every reply weight 0); a run in which that
    stays 0 (clients that all fail: a data setting they cannot load, a node config they
    lack; or clients whose models never beat the global one) only ever re-broadcast the
    initial model and must not be taken for a result.
    """
    counts = {"rounds": 0, "replies": 0, "missing": {}}
    aggregate_train = strategy.aggregate_train

    def counted(server_round, replies):
        arrays, metrics = aggregate_train(server_round, replies)
        counts["rounds"] += 1
        used = metrics.get("replies-used", 0) if metrics is not None else 0
        counts["replies"] += int(used) if isinstance(used, int) else 0
        # Per round as Flower numbers it: the nodes sent an instruction that never replied.
        counts["missing"][server_round] = metrics.get("replies-missing") if metrics is not None else None
        return arrays, metrics

    strategy.aggregate_train = counted
    return counts


class SortedNodeGrid:
    """A Grid whose node IDs come sorted; everything else goes to ``grid``.

    Why: Flower samples a round's nodes by their position in ``get_node_ids()``
    (``random.sample``), and a SuperLink lists them in a set's order, which can differ
    between two runs with the same nodes (it depends on the order they registered in).
    Sorted, the run's seed alone fixes which nodes a round trains.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids())


class StoppableGrid:
    """A Grid whose rounds give up as soon as ``stop`` is set, instead of waiting out the timeout.

    Why: in a simulation the ServerApp runs in a thread beside Flower's simulation runtime.
    A Ctrl-C or SIGTERM in the main thread ends the runtime, but the server thread would go
    on: wait out ``round-timeout`` for replies that never come, record and checkpoint each
    empty round, and mark the run finished, which a grid then skips for good. Each
    ``send_and_receive`` runs Flower's own in a daemon thread and returns its replies, or
    raises :class:`RunStopped` once ``stop`` is set. Everything else goes to ``grid``.
    """

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self._grid, self._stop = grid, stop

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def check(self) -> None:
        if self._stop.is_set():
            raise RunStopped("the simulation runtime stopped; the run ends without finishing")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self.check()
        outcome: dict[str, object] = {}
        done = threading.Event()

        def exchange() -> None:
            try:
                outcome["replies"] = list(self._grid.send_and_receive(messages, timeout=timeout))
            except BaseException as error:  # noqa: BLE001  (re-raised in the server's thread below)
                outcome["error"] = error
            finally:
                done.set()

        threading.Thread(target=exchange, name="softmerge-round", daemon=True).start()
        while not done.wait(STOP_POLL_SECONDS):
            self.check()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["replies"]


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, parse_run_config(context.run_config))


def make_server_app(settings: RunSettings, num_nodes: int | None = None,
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp bound to fixed settings, for in-process simulations that set no run config.

    ``num_nodes``, the simulation's node count, and ``stop`` are passed on to :func:`run_server`.
    Its clients are the simulation's own ClientApps, so their labels can be believed: a
    resumed simulation's new node IDs take their clients' trust records (``follow_labels``).
    """
    bound = ServerApp()
    bound.main()(lambda grid, context: run_server(grid, settings, num_nodes=num_nodes, stop=stop,
                                                  follow_labels=True))
    return bound


def run_server(grid: Grid, settings: RunSettings, num_nodes: int | None = None,
               stop: threading.Event | None = None, follow_labels: bool = False) -> ResultsWriter:
    """Run one federated experiment on ``grid``; returns the per-round results.

    With an ``output-dir``, every round is checkpointed there, and a run restarted with
    the same config resumes after the last checkpointed round (``resume = false`` starts
    over instead). ``num_nodes`` is the number of nodes, when the caller knows it (a
    simulation does); otherwise the nodes connected at the start are counted. The count is
    recorded in ``results.json`` (MultiKrum sizes its selection from each round's replies).
    A second run on the same ``output-dir`` while this one runs raises
    :class:`~softmerge.server.output_lock.OutputBusy`. Once ``stop`` (if given) is set, the
    run raises :class:`RunStopped` at once: no further round is recorded or checkpointed,
    and it is not marked finished, so a restart resumes after its last real round.
    ``follow_labels`` lets SoftMerge's restored trust records follow the clients' labels to
    new node IDs; only for clients whose labels can be believed (see :class:`SoftMerge`).
    """
    if stop is not None:
        grid = StoppableGrid(grid, stop)
    if not settings.output_dir:
        return _run_server(grid, settings, num_nodes, follow_labels)
    with output_lock(Path(settings.output_dir)):
        return _run_server(grid, settings, num_nodes, follow_labels)


def _run_server(grid: Grid, settings: RunSettings, num_nodes: int | None, follow_labels: bool) -> ResultsWriter:
    stoppable = grid if isinstance(grid, StoppableGrid) else None
    task = task_data(settings)
    model = build_model(settings.dataset, seed=settings.seed)
    gate_split = task.gate.tensors()
    output = Path(settings.output_dir) if settings.output_dir else None
    run_config = to_run_config(settings)
    fingerprint = config_fingerprint(run_config)
    writer = ResultsWriter(output, run_config)
    checkpoint = load_checkpoint(output, fingerprint, run_config) if output is not None and settings.resume else None
    done = 0
    if checkpoint is not None:
        done = checkpoint.server_round
        model.load_state_dict({name: torch.from_numpy(array) for name, array in checkpoint.arrays.items()})
        writer.resume(load_results_to_resume(output, done), done)
        log(INFO, "softmerge: resuming from the checkpoint of round %d in %s", done, output)
        if writer.earlier_software:
            log(WARNING, "softmerge: this run's earlier rounds ran under other versions (%s), now %s; "
                "results.json keeps both", writer.earlier_software[-1], writer.software)

    started_with = recorded_nodes(checkpoint) if checkpoint is not None else None
    if num_nodes is not None and checkpoint is not None:
        check_node_count(checkpoint, num_nodes, output)
    if num_nodes is None:
        # In a simulation the nodes may not have registered yet (an empty list): told the
        # count, a simulation does not depend on that race.
        try:
            num_nodes = len(list(grid.get_node_ids())) or None
        except Exception:  # noqa: BLE001  (a grid that cannot list nodes yet just leaves n unknown)
            num_nodes = None
        if started_with is not None and num_nodes != started_with:
            # A deployment's nodes come and go; results.json keeps the count the run started with.
            log(WARNING, "softmerge: the checkpoint's run started with %d nodes, %s are connected now",
                started_with, num_nodes if num_nodes is not None else "none")
            num_nodes = started_with
    writer.nodes = num_nodes
    if num_nodes:
        if outside := malicious_ids_outside(settings, num_nodes):
            # A simulation refuses this before it starts (check_simulation); nodes may still connect here.
            log(WARNING, "softmerge: malicious partition ids %s are beyond the %d nodes connected at the start: "
                "unless more nodes connect, the '%s' attack%s has fewer attackers than configured", outside,
                num_nodes, settings.attack, " (and the oracle's exclusion)" if settings.exclude_malicious else "")
        replies = rule_replies(settings, num_nodes)
        if problem := node_count_problem(settings.strategy, replies, settings.assumed_malicious):
            # More nodes may still connect; a simulation checked this before it started.
            log(WARNING, "softmerge: %s with %d nodes connected at the start and assumed-malicious %d: %s "
                "(rounds with fewer replies do not get the rule's guarantee; Bulyan keeps the global model)",
                settings.strategy, num_nodes, settings.assumed_malicious, problem)
    strategy = build_strategy(settings, model, gate_split, num_nodes=num_nodes, follow_labels=follow_labels)
    if settings.exclude_malicious:
        from ..simulations.oracle import exclude_partitions

        exclude_partitions(strategy, settings.malicious_ids)
    adversary = None
    if is_colluding_attack(settings.attack):
        # Simulation only: an omniscient adversary rewrites the malicious replies from the
        # benign ones before the defense sees them; the defense is never told who they are.
        from ..simulations.colluding import is_adaptive_attack
        from ..simulations.harness import clean_loss_oracle, make_colluding
        from ..simulations.tasks import attacker_sample

        adaptive = {}
        if is_adaptive_attack(settings.attack):
            # The adaptive attacker holds as much clean data as the server's gate split.
            sample = attacker_sample(task, settings.server_gate_size, settings.seed)
            adaptive["loss_of"] = clean_loss_oracle(build_model(settings.dataset, seed=settings.seed), sample)
        adversary = make_colluding(strategy, settings.attack, settings.malicious_ids, seed=settings.seed,
                                   statistics=running_statistics(model), **adaptive)
        if checkpoint is not None:
            adversary.restore_checkpoint_arrays(arrays_under(checkpoint.strategy_arrays, ADVERSARY_PREFIX))
    if checkpoint is not None and hasattr(strategy, "load_trust_state") and "trust_record" in checkpoint.state:
        # Node IDs are the record's keys. A deployment's nodes keep theirs; a simulation draws
        # new ones on every start, and the strategy then moves each record to its client's label.
        strategy.load_trust_state(checkpoint.state["trust_record"])
    if checkpoint is not None and hasattr(strategy, "restore_checkpoint_arrays"):
        strategy.restore_checkpoint_arrays(checkpoint.strategy_arrays, server_round=done)
    if done:
        offset_rounds(strategy, done)
    used = count_used_replies(strategy)
    # Replies used over the whole run, this process's and the checkpointed rounds' (None: a
    # checkpoint written before the count was kept, whose rounds may have trained).
    earlier_used = checkpoint.state.get("replies_used", None) if checkpoint is not None else 0
    earlier_used = earlier_used if isinstance(earlier_used, int) and not isinstance(earlier_used, bool) else None
    evaluation_model = build_model(settings.dataset, seed=settings.seed)

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord:
        if stoppable is not None:
            stoppable.check()  # a round the runtime did not serve is not recorded
        server_round = local_round + done
        evaluation_model.load_state_dict(decode_state(arrays))
        loss, accuracy = evaluate_model(evaluation_model, task.test)
        metrics = {"test-acc": accuracy, "test-loss": loss}
        extra = {}
        if settings.attack.startswith("backdoor"):
            extra["backdoor_asr"] = attack_success_rate(evaluation_model, task.test, settings.backdoor_target)
            metrics["backdoor-asr"] = extra["backdoor_asr"]
        if local_round == 0 and checkpoint is not None:
            # The resumed model was recorded before the restart (round 0 too, when the kill came in round 1).
            writer.restart_clock()
            return MetricRecord(metrics)
        report = getattr(strategy, "reports", {}).get(server_round)
        if used["missing"].get(local_round) is not None:
            extra["replies_missing"] = used["missing"][local_round]
        writer.record(server_round, accuracy, loss, report, extra=extra)
        if output is not None:
            gate_state = {"gate_log_alpha": report.log_alpha, "gate_candidates": report.candidates} if report else {}
            if getattr(strategy, "trust", False):
                gate_state["trust_record"] = strategy.trust_state()
            carried = dict(strategy.checkpoint_arrays()) if hasattr(strategy, "checkpoint_arrays") else {}
            if adversary is not None:
                carried.update({ADVERSARY_PREFIX + name: a for name, a in adversary.checkpoint_arrays().items()})
            save_checkpoint(output, server_round, {k: a.numpy() for k, a in arrays.items()}, fingerprint,
                            {**gate_state, "nodes": writer.nodes,
                             "replies_used": None if earlier_used is None else earlier_used + used["replies"]},
                            strategy_arrays=carried, run_config=run_config)
        return MetricRecord(metrics)

    log(INFO, "softmerge: %s on %s, %d rounds; gate split %d, test split %d", settings.strategy, settings.dataset,
        settings.num_server_rounds, len(task.gate), len(task.test))
    if checkpoint is not None:
        restore_rng_state(checkpoint.state["rng"])
    else:
        # Flower samples nodes with Python's random (fraction-train < 1): seeded, and with the
        # node IDs sorted (SortedNodeGrid), a deployment whose nodes keep their IDs trains the
        # same clients in every run of a config.
        random.seed(settings.seed)
        np.random.seed(settings.seed)
        torch.manual_seed(settings.seed)
    remaining = settings.num_server_rounds - done
    try:
        if remaining > 0:
            with true_round_numbers(done, settings.num_server_rounds):
                strategy.start(
                    grid=SortedNodeGrid(grid),
                    initial_arrays=ArrayRecord(model.state_dict()),
                    num_rounds=remaining,
                    timeout=settings.round_timeout,
                    train_config=ConfigRecord({"seed": settings.seed}),
                    evaluate_fn=evaluate_fn,
                )
        if stoppable is not None:
            stoppable.check()
        rounds = done + used["rounds"]
        if rounds and earlier_used is not None and not earlier_used + used["replies"]:
            # Also when a rerun resumes such a run with no rounds left: it is still untrained.
            raise NoClientUpdates(
                f"none of the {rounds} rounds put a client reply into the model, so it was never trained: the "
                "log names each excluded reply and why (a client that failed to load its data or lacks its node "
                "config replies with an error), each node that never replied, and each round whose rule skipped, "
                "failed or overflowed")
    except BaseException as error:
        # Otherwise results.json says "running" for good after `flwr stop`, a Ctrl-C or a crash.
        # The checkpoint is untouched: the same command resumes after the last recorded round.
        stopped = isinstance(error, (RunNotRunningException, RunStopped, KeyboardInterrupt))
        try:
            writer.flush(status="stopped" if stopped else "failed")
        except OSError as flush_error:
            log(WARNING, "softmerge: could not mark %s/results.json %s: %s", output,
                "stopped" if stopped else "failed", flush_error)
        raise
    writer.flush(status="finished")
    return writer


# Flower's Strategy.start announces each round with this message, counting from 1.
FLOWER_ROUND_MESSAGE = "[ROUND %s/%s]"


@contextmanager
def true_round_numbers(done: int, total: int) -> Iterator[None]:
    """Make Flower's round banners name the run's rounds while a resumed run's ``start`` runs.

    ``Strategy.start`` restarts at round 1 of the rounds left, so a run resumed after round 3
    of 10 would log ``[ROUND 1/7]`` for its round 4. Only records of this thread (the one
    that calls ``start``) are rewritten, so another run in the process keeps its own.
    """
    if not done:
        yield
        return
    thread = threading.get_ident()

    def renumber(record: logging.LogRecord) -> bool:
        if record.msg == FLOWER_ROUND_MESSAGE and record.thread == thread and isinstance(record.args, tuple) \
                and len(record.args) == 2 and isinstance(record.args[0], int):
            record.args = (record.args[0] + done, total)
        return True

    flower_logger = logging.getLogger("flwr")
    flower_logger.addFilter(renumber)
    try:
        yield
    finally:
        flower_logger.removeFilter(renumber)


def offset_rounds(strategy: FedAvg, offset: int) -> FedAvg:
    """Make a strategy that restarts at local round 1 see the run's true round numbers.

    ``Strategy.start`` always counts from 1; a resumed run must hand clients and gates the
    same round numbers (and so the same seeds) as an uninterrupted one.
    """
    for name in ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate"):
        method = getattr(strategy, name)
        setattr(strategy, name, lambda server_round, *args, _method=method: _method(server_round + offset, *args))
    return strategy
