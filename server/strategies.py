"""Choose a strategy by name: SoftMerge, or one of Flower's own strategies unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from torch import nn

from ..aggregation import GateReport, SoftMergeConfig
from ..aggregation.candidates import running_statistics
from ..simulations.config import RunSettings
from .baselines import CenteredClipping, FLTrust, GeometricMedian
from .replies import harden
from .strategy import SoftMerge


class RoundSizedMultiKrum(MultiKrum):
    """Flower's MultiKrum, selecting m = n - f of each round's n valid replies.

    Blanchard et al. (NeurIPS 2017) average the m = n - f updates with the best Krum
    scores. Flower's MultiKrum fixes m when it is built, before a server knows how many
    nodes will reply (a deployment's nodes connect later; a simulation's may not have
    registered yet), and a round with dropouts has fewer. This sets m from each round's
    replies with content, then runs Flower's rule unchanged.
    """

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = sum(1 for reply in replies if not reply.has_error() and reply.has_content())
        self.num_nodes_to_select = max(1, valid - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


def merge_config_from(settings: RunSettings) -> SoftMergeConfig:
    return SoftMergeConfig(
        units=settings.merge_units, mode=settings.softmerge_mode, steps=settings.softmerge_steps,
        lr=settings.softmerge_lr, l0_lambda=settings.softmerge_l0, batch_size=settings.softmerge_batch_size,
        seed=settings.seed,
        include_keep=settings.softmerge_keep, keep_mode=settings.softmerge_keep_mode,
        tolerance=settings.softmerge_tolerance,
        threads=settings.softmerge_threads, max_candidates=settings.softmerge_max_candidates,
        warm_start_temperature=settings.softmerge_warm_temperature, warm_start_ceiling=settings.softmerge_ceiling,
        warm_start_step=settings.softmerge_warm_step, warm_start_bend=settings.softmerge_warm_bend,
        warm_start_bend_quantile=settings.softmerge_warm_bend_quantile,
        merge_step_share=settings.softmerge_merge_step_share,
        mirror_test=settings.softmerge_mirror_test, mirror_temperature=settings.softmerge_mirror_temperature,
        mirror_confidence=settings.softmerge_mirror_confidence,
        mirror_specialist_ratio=settings.softmerge_mirror_specialists,
        mirror_flipped_ratio=settings.softmerge_mirror_flipped,
        mirror_trusted=settings.softmerge_mirror_trusted,
        merge_duplicates=settings.softmerge_merge_duplicates,
        near_duplicate_tolerance=settings.softmerge_near_duplicates, trust_strength=settings.softmerge_trust_strength,
        harm_margin=settings.softmerge_harm_margin, example_weights=settings.softmerge_example_weights,
        beat_constant=settings.softmerge_beat_constant, uninformed_merge=settings.softmerge_uninformed_merge,
        # The server trains on the gate split the way clients train, as FLTrust's does.
        server_epochs=settings.local_epochs, server_lr=settings.learning_rate, server_batch_size=settings.batch_size,
    )


def build_strategy(
    settings: RunSettings,
    model: nn.Module,
    gate_split: tuple[torch.Tensor, torch.Tensor],
    on_report: Callable[[int, GateReport], None] | None = None,
    num_nodes: int | None = None,
    follow_labels: bool = False,
) -> FedAvg:
    """The strategy named by ``settings.strategy``, with the run's sampling settings.

    Flower's strategies are used unchanged, but :func:`harden` screens their replies and
    guards their output, so a malformed reply cannot end the run (SoftMerge and the
    baselines of :mod:`softmerge.server.baselines` screen their own).

    MultiKrum selects n - f of each round's n replies, as Blanchard et al. do
    (:class:`RoundSizedMultiKrum`); ``num_nodes``, if known, only fills in its start-up log.
    ``follow_labels`` goes to :class:`SoftMerge` (an in-process simulation's own clients only).
    """
    common = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        # Flower waits, with no deadline, for min_available_nodes before every round.
        min_available_nodes=settings.min_nodes,
        min_train_nodes=settings.min_nodes,
        min_evaluate_nodes=0 if settings.fraction_evaluate == 0 else settings.min_nodes,
    )
    name = settings.strategy
    if name == "softmerge":
        return SoftMerge(model, gate_split, merge_config_from(settings), on_report=on_report,
                         trust=settings.softmerge_trust, trust_memory=settings.softmerge_trust_memory,
                         trust_max_records=settings.softmerge_trust_max_records,
                         trust_copies=settings.softmerge_trust_copies, follow_labels=follow_labels, **common)
    if name == "fltrust":
        # The server model trains on the root set the way clients train (Cao et al. 2021).
        return FLTrust(model, gate_split, epochs=settings.local_epochs, learning_rate=settings.learning_rate,
                       batch_size=settings.batch_size, momentum=0.9, seed=settings.seed,
                       match_client_steps=settings.fltrust_match_client_steps, **common)
    if name == "centered-clipping":
        return CenteredClipping(tau=settings.cclip_tau, iterations=settings.cclip_iterations,
                                statistics=running_statistics(model), **common)
    if name == "geomed":
        return GeometricMedian(statistics=running_statistics(model), **common)
    return harden(_flower_strategy(name, settings, common, num_nodes))


def _flower_strategy(name: str, settings: RunSettings, common: dict, num_nodes: int | None) -> FedAvg:
    f = settings.assumed_malicious
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=settings.trim_beta, **common)
    if name == "krum":
        return Krum(num_malicious_nodes=f, **common)
    if name == "multikrum":
        # m is set from each round's replies; the node count, if known, only sets the value
        # Flower's start-up summary prints (1 when unknown).
        selected = max(1, num_nodes - f) if num_nodes else 1
        return RoundSizedMultiKrum(num_malicious_nodes=f, num_nodes_to_select=selected, **common)
    if name == "bulyan":
        return Bulyan(num_malicious_nodes=f, **common)
    raise ValueError(f"unknown strategy {name!r}")
