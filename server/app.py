"""The ServerApp: builds task, model, strategy and evaluation from the run config.

The server's clean data is split into a *gate* split, which SoftMerge learns its gates
on, and a *test* split, which ``evaluate_fn`` reports accuracy on. The gates never see
the test split, for every strategy alike.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from ..simulations.config import RunSettings, parse_run_config, task_data, to_run_config
from ..simulations.tasks import attack_success_rate, build_model, evaluate_model
from .results import ResultsWriter
from .strategies import build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, parse_run_config(context.run_config))


def make_server_app(settings: RunSettings) -> ServerApp:
    """A ServerApp bound to fixed settings, for in-process simulations that set no run config."""
    bound = ServerApp()
    bound.main()(lambda grid, context: run_server(grid, settings))
    return bound


def run_server(grid: Grid, settings: RunSettings) -> ResultsWriter:
    """Run one federated experiment on ``grid``; returns the per-round results."""
    task = task_data(settings)
    model = build_model(settings.dataset, seed=settings.seed)
    gate_split = task.gate.tensors()
    writer = ResultsWriter(Path(settings.output_dir) if settings.output_dir else None, to_run_config(settings))
    try:
        num_nodes = len(list(grid.get_node_ids())) or None
    except Exception:  # noqa: BLE001  (a grid that cannot list nodes yet just leaves n unknown)
        num_nodes = None
    strategy = build_strategy(settings, model, gate_split, num_nodes=num_nodes)
    if settings.exclude_malicious:
        from ..simulations.oracle import exclude_partitions

        exclude_partitions(strategy, settings.malicious_ids)
    evaluation_model = build_model(settings.dataset, seed=settings.seed)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluation_model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate_model(evaluation_model, task.test)
        report = getattr(strategy, "reports", {}).get(server_round)
        metrics = {"test-acc": accuracy, "test-loss": loss}
        extra = {}
        if settings.attack == "backdoor":
            extra["backdoor_asr"] = attack_success_rate(evaluation_model, task.test, settings.backdoor_target)
            metrics["backdoor-asr"] = extra["backdoor_asr"]
        writer.record(server_round, accuracy, loss, report, extra=extra)
        return MetricRecord(metrics)

    log(INFO, "softmerge: %s on %s, %d rounds; gate split %d, test split %d", settings.strategy, settings.dataset,
        settings.num_server_rounds, len(task.gate), len(task.test))
    torch.manual_seed(settings.seed)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=settings.num_server_rounds,
        train_config=ConfigRecord({"seed": settings.seed}),
        evaluate_fn=evaluate_fn,
    )
    writer.flush(status="finished")
    return writer
