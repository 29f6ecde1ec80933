"""Soft merging as a Flower strategy.

Chen et al., "Soft Merging", arXiv:2309.12259 (2023), with hard-concrete gates of
Louizos, Welling & Kingma (2018). Each round the client models are candidate local
optima; the server learns one gate per (merge unit, candidate) on its small clean gate
split and broadcasts

    theta_u = sum_k w_uk * theta_uk,   w_uk = z_uk / sum_j z_uj   (mode "weight"),

where the candidates are the valid replies plus the current global model (the keep
candidate). The math lives in :func:`softmerge.aggregation.soft_merge`; this class only
turns Flower messages into candidates and the merged state back into an ArrayRecord.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch import nn

from ..aggregation import Exclusion, GateReport, SoftMergeConfig, soft_merge


class SoftMerge(FedAvg):
    """Soft-merge strategy: learned hard-concrete gates over client models, per layer.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture; its weights at construction are only a template.
    validation : tuple[torch.Tensor, torch.Tensor]
        The server's clean gate split ``(inputs, labels)``. Report accuracy on data the
        gates never see (``evaluate_fn`` on a separate test split).
    merge_config : SoftMergeConfig, optional
        Units, mode, steps, learning rate, L0 weight, batch size, seed, keep candidate.
    label_key : str (default: "partition-id")
        MetricRecord key whose value names a candidate in reports, if a client sends it.
        It is only a label: gating never reads it.
    on_report : callable, optional
        Called as ``on_report(server_round, report)`` after every merge.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling, record keys).
    """

    def __init__(
        self,
        model: nn.Module,
        validation: tuple[torch.Tensor, torch.Tensor],
        merge_config: SoftMergeConfig | None = None,
        label_key: str = "partition-id",
        on_report: Callable[[int, GateReport], None] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.validation = validation
        self.merge_config = merge_config or SoftMergeConfig()
        self.label_key = label_key
        self.on_report = on_report
        self.reports: dict[int, GateReport] = {}
        self._global_state: dict[str, torch.Tensor] | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> SoftMerge settings:")
        cfg = self.merge_config
        log(INFO, "\t│\t├── units: %s | mode: %s | keep candidate: %s", cfg.units, cfg.mode, cfg.include_keep)
        log(INFO, "\t│\t├── steps: %d | lr: %g | L0 lambda: %g | batch: %d", cfg.steps, cfg.lr, cfg.l0_lambda,
            cfg.batch_size)
        log(INFO, "\t│\t└── gate split: %d examples", len(self.validation[1]))
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # aggregate_train is not given the model the round started from; it is the keep candidate.
        self._global_state = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Gate the valid replies' models on the gate split and return the merged model."""
        candidates, labels, contents, rejected = self._candidates_from_replies(list(replies))
        # Replies arrive in completion order; sorting makes the gate noise, and so the
        # merge, reproducible for a given seed.
        order = sorted(range(len(labels)), key=lambda i: _natural_key(labels[i]))
        candidates, labels = [candidates[i] for i in order], [labels[i] for i in order]
        keep = self._global_state if self._global_state is not None else self.model.state_dict()
        round_config = replace(self.merge_config, seed=self.merge_config.seed + server_round)
        merged, report = soft_merge(self.model, candidates, self.validation, round_config, keep=keep,
                                    labels=labels)
        report.excluded = rejected + report.excluded
        self.reports[server_round] = report
        self._log_report(server_round, report)
        if self.on_report is not None:
            self.on_report(server_round, report)

        metrics = self._aggregate_client_metrics(contents)
        metrics.update(report_summary(report))
        return ArrayRecord(merged), metrics

    def _candidates_from_replies(self, replies: list[Message]):
        """Turn replies into candidate state dicts; unreadable replies are rejected with a reason."""
        candidates, labels, contents, rejected = [], [], [], []
        for position, msg in enumerate(replies):
            node = f"node-{msg.metadata.src_node_id}"
            if msg.has_error():
                rejected.append(Exclusion(position, node, f"error reply: {msg.error.reason}"))
                continue
            try:
                arrays = list(msg.content.array_records.values())
                if len(arrays) != 1:
                    raise ValueError(f"expected one ArrayRecord, got {len(arrays)}")
                state = arrays[0].to_torch_state_dict()
            except Exception as error:  # noqa: BLE001  (any unreadable reply is excluded, never fatal)
                rejected.append(Exclusion(position, node, f"unreadable reply: {error}"))
                continue
            candidates.append(state)
            labels.append(self._label(msg, node, labels))
            contents.append(msg.content)
        return candidates, labels, contents, rejected

    def _label(self, msg: Message, node: str, taken: list[str]) -> str:
        label = node
        for record in msg.content.metric_records.values():
            value = record.get(self.label_key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                label = f"client-{int(value)}"
        return label if label not in taken else f"{label}@{node}"

    def _aggregate_client_metrics(self, contents: list[RecordDict]) -> MetricRecord:
        try:
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) if contents else MetricRecord()
        except Exception as error:  # noqa: BLE001  (client metrics are informational only)
            log(WARNING, "SoftMerge: client train metrics not aggregated: %s", error)
            metrics = MetricRecord()
        if self.label_key in metrics:
            del metrics[self.label_key]
        return metrics

    @staticmethod
    def _log_report(server_round: int, report: GateReport) -> None:
        log(INFO, "SoftMerge round %d: %d candidates, %d excluded, %d steps (%d skipped) in %.2fs; "
            "gate-split accuracy %.3f -> %.3f", server_round, len(report.candidates), len(report.excluded),
            report.steps, report.skipped_steps, report.seconds, report.accuracy_before, report.accuracy_after)
        for exclusion in report.excluded:
            log(WARNING, "SoftMerge round %d: excluded %s: %s", server_round, exclusion.label, exclusion.reason)
        if report.fallback_units:
            log(WARNING, "SoftMerge round %d: every gate closed in %s; kept the previous global model there",
                server_round, report.fallback_units)
        for line in report.table().splitlines():
            log(INFO, "\t%s", line)


def _natural_key(label: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def report_summary(report: GateReport) -> dict[str, float | int]:
    """The GateReport in MetricRecord form (scalars only)."""
    keep_share = report.weight_on(["keep"])
    return {
        "softmerge-candidates": len(report.candidates),
        "softmerge-excluded": len(report.excluded),
        "softmerge-steps": report.steps,
        "softmerge-skipped-steps": report.skipped_steps,
        "softmerge-seconds": float(report.seconds),
        "softmerge-gate-acc-before": float(report.accuracy_before),
        "softmerge-gate-acc-after": float(report.accuracy_after),
        "softmerge-keep-weight": float(keep_share),
        "softmerge-fallback-units": len(report.fallback_units),
    }
