"""Soft merging as a Flower strategy.

Chen et al., "Soft Merging", arXiv:2309.12259 (2023), with hard-concrete gates of
Louizos, Welling & Kingma (2018). Each round the client models are candidate local
optima; the server learns one gate per (merge unit, candidate) on its small clean gate
split and broadcasts

    theta_u = sum_k w_uk * theta_uk,   w_uk = z_uk / sum_j z_uj   (mode "weight"),

where the candidates are the valid replies plus the current global model (the keep model:
by default shut in the first gate learning, and the fallback and retry start of the no-harm
check). The math lives in :func:`softmerge.aggregation.soft_merge`; this class only
turns Flower messages into candidates and the merged state back into an ArrayRecord.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from logging import ERROR, INFO, WARNING

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.supercore import log
from torch import nn

from ..aggregation import GateReport, SoftMergeConfig, soft_merge
from ..aggregation.merge import DIRECTION_START, KEEP_LABEL, build_merge_units, checked_split, stack_in_place
from ..aggregation.trust import NEUTRAL_TRUST, forget_least_recent, relative_openness, trust_of, update_record
from .replies import (
    RoundStartMemory,
    aggregate_client_metrics,
    candidate_label,
    log_missing,
    log_unaveraged,
    screen_replies,
    sort_key,
)


class SoftMerge(RoundStartMemory):
    """Soft-merge strategy: learned hard-concrete gates over client models, per merge unit.

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
    trust : bool (default: True)
        Carry trust over rounds: keep each client's gate record, keyed by its Flower node
        ID, and bound the start of a client refused in most of its recent rounds (see
        :mod:`softmerge.aggregation.trust`; ``merge_config.trust_strength`` sets how far).
        False judges every round on its own.
    trust_memory : float (default: 0.9)
        Discount of a client's record per round it is gated (1 never forgets).
    trust_max_records : int (default: 100_000)
        The most node IDs the record keeps; beyond it, the least recently gated are
        forgotten (and start neutral if they return, like a node under a new ID). It bounds
        the record's memory and the checkpoint's size in a long deployment where nodes leave
        and new node IDs keep arriving.
    trust_copies : bool (default: True)
        Whether a client whose reply is identical (or, with
        ``merge_config.near_duplicate_tolerance``, near-identical) to another's earns trust from
        the gate the group shares. False caps such a client's recorded openness at neutral
        (1/2): a node that resends an honest client's update cannot build that client's record,
        or launder its own, and colluders sending one crafted reply earn none from the group's
        gate; a shut group is still recorded shut. (True, the default, is what the reference
        benchmark ran; False is safer and has not run on it yet.)
    follow_labels : bool (default: False)
        When none of the nodes in a restored record reply (every node ID changed), move
        each record to the one node whose replies now carry its label. Only for callers
        whose clients' labels can be believed: an in-process simulation, whose ClientApps
        are its own and draw new node IDs on every start (``softmerge-sim`` and the grid
        set it). A label is a client's claim, and a record with trust of at least
        ``merge_config.mirror_trusted`` spares its holder the mirror test, so in a
        deployment (where a SuperLink restarted without its database hands out new node
        IDs) following labels would let a malicious node take an absent honest client's
        record. Off, such records stay with their old node IDs and the new nodes start
        neutral.
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
        trust: bool = True,
        trust_memory: float = 0.9,
        trust_max_records: int = 100_000,
        trust_copies: bool = True,
        follow_labels: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        # A split the model cannot score (wrong dtype, shape or label range) fails here, not
        # in the first round's merge after every client has trained.
        self.validation = checked_split(model, validation, "gate")
        self.merge_config = merge_config or SoftMergeConfig()
        # A unit pattern that matches no tensor raises here, not in the first round's merge.
        build_merge_units(model, self.merge_config.units)
        self.label_key = label_key
        self.on_report = on_report
        self.reports: dict[int, GateReport] = {}
        if not 0.0 <= trust_memory <= 1.0:
            raise ValueError(f"trust_memory must be in [0, 1], got {trust_memory!r}")
        if isinstance(trust_max_records, bool) or not isinstance(trust_max_records, int) or trust_max_records < 1:
            raise ValueError(f"trust_max_records must be a whole number of at least 1, got {trust_max_records!r}")
        self.trust = trust
        self.trust_memory = trust_memory
        self.trust_max_records = trust_max_records
        self.trust_copies = trust_copies
        self._warned_about_cap = False
        self._warned_about_blind = False
        self.follow_labels = follow_labels
        # node ID (as text, for JSON checkpoints) -> (discounted rounds open, discounted rounds gated),
        # from the least to the most recently gated (checkpoints keep the order)
        self.trust_record: dict[str, tuple[float, float]] = {}
        # node ID -> the label its replies carried, so a record can follow its client to a new node ID
        self.trust_labels: dict[str, str] = {}
        # After a restore: None until the first round shows whether its nodes came back; then
        # the restored node IDs whose record no replying node has taken yet (see _follow_restored_record).
        self._unclaimed: set[str] | None = set()

    def summary(self) -> None:
        log(INFO, "\t├──> SoftMerge settings:")
        cfg = self.merge_config
        log(INFO, "\t│\t├── units: %s | mode: %s | keep model: %s (%s)", cfg.units, cfg.mode, cfg.include_keep,
            cfg.keep_mode)
        log(INFO, "\t│\t├── steps: %d | lr: %g | L0 lambda: %g | batch: %d", cfg.steps, cfg.lr, cfg.l0_lambda,
            cfg.batch_size)
        step = (f"the merge step when the bends' {cfg.warm_start_bend_quantile:g} quantile reaches "
                f"{cfg.warm_start_bend:g} nats, else the candidate's" if cfg.warm_start_step == "auto"
                else f"the {cfg.warm_start_step} step")
        log(INFO, "\t│\t├── warm start: %s (scored at %s) | ceiling: %s | mirror test: %s (z = %g) | "
            "identical replies share a gate: %s | near-identical: %g", cfg.warm_start, step,
            cfg.warm_start_ceiling, cfg.mirror_test, cfg.mirror_confidence, cfg.merge_duplicates,
            cfg.near_duplicate_tolerance)
        log(INFO, "\t│\t├── example-count weights over the selected (capped at their median): %s",
            cfg.example_weights)
        log(INFO, "\t│\t├── no-harm check: margin %g nats | must beat the label frequencies: %s", cfg.harm_margin,
            cfg.beat_constant and bool(cfg.harm_margin))
        log(INFO, "\t│\t├── trust over rounds: %s (strength %g, memory %g, at most %d records, copies earn "
            "trust: %s)", self.trust, cfg.trust_strength, self.trust_memory, self.trust_max_records,
            self.trust_copies)
        log(INFO, "\t│\t└── gate split: %d examples", len(self.validation[1]))
        super().summary()

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Gate the valid replies' models on the gate split and return the merged model.

        Replies are screened first (see :mod:`softmerge.server.replies`): a malformed or
        hostile reply is excluded with a reason and never raises.
        """
        keep = self._global_state if self._global_state is not None else self.model.state_dict()
        screened = screen_replies(replies, keep, self.weighted_by_key, arrayrecord_key=self.arrayrecord_key,
                                  sent=self._sent_train)
        log_missing(server_round, "train", screened.missing)
        log_unaveraged(server_round, "train", screened.unaveraged)
        # Replies arrive in completion order; sorting makes the gate noise, and so the
        # merge, reproducible for a given seed.
        order = sorted(range(len(screened.messages)), key=lambda i: sort_key(screened.messages[i]))
        messages = [screened.messages[i] for i in order]
        # The round's metrics are averaged over the replies whose metrics have its most common form.
        averaged = [screened.messages[i].content for i in order if screened.averaged[i]]
        states = [screened.states[i] for i in order]
        screened.states.clear()
        labels: list[str] = []
        for message in messages:
            labels.append(candidate_label(message, labels, self.label_key))
        # The record is keyed by node ID: a client chooses its label, not its ID.
        nodes = [str(message.metadata.src_node_id) for message in messages]
        if nodes and (self._unclaimed is None or self._unclaimed):
            self._follow_restored_record(server_round, nodes, labels)
        trust = [trust_of(self.trust_record, node) for node in nodes] if self.trust else None
        recorded = [node in self.trust_record for node in nodes] if self.trust else None
        # The screen has checked every count (a finite number in (0, MAX_NUM_EXAMPLES]).
        examples = [_example_count(message, self.weighted_by_key) for message in messages]
        # Modulo: a seed just under 2**63 (which the config accepts) stays in range in later rounds.
        round_config = replace(self.merge_config, seed=(self.merge_config.seed + server_round) % 2**63)
        # Move the decoded models into the stacked layout the gates learn on, so the round
        # holds one copy of them instead of two; the merge itself is unchanged.
        try:
            keep_view = stack_in_place(self.model, states, keep, round_config.units)
            merged, report = soft_merge(self.model, states, self.validation, round_config,
                                        keep=keep_view if keep_view is not None else keep, labels=labels,
                                        trust=trust, examples=examples, recorded=recorded,
                                        record_held=bool(self.trust_record) if self.trust else None)
        except Exception as error:  # noqa: BLE001  (as the hardened baselines: a failed merge must not end the run)
            log(ERROR, "SoftMerge round %d: the merge failed (%s: %s); keeping the global model and recording "
                "nothing about the clients", server_round, type(error).__name__, error, exc_info=True)
            metrics = aggregate_client_metrics(self, averaged, (self.label_key,))
            metrics.update({"softmerge-merge-failed": 1, "replies-excluded": len(screened.rejected),
                            "replies-used": 0, "replies-missing": len(screened.missing)})
            return ArrayRecord({name: tensor.clone() for name, tensor in keep.items()}), metrics
        del states, keep_view
        overflowed = not all(torch.isfinite(t).all() for t in merged.values() if t.dtype.is_floating_point)
        # A round whose first merge failed the no-harm check is not evidence about the
        # clients: the failure is the optimisation's, and the last retry starts every client
        # closed. Nor is one whose merge did no better than the label frequencies, or one
        # whose merge overflowed and was discarded.
        if self.trust and report.rejected_loss is None and not report.uninformed and not overflowed:
            self._record_round(report, dict(zip(labels, nodes)), server_round)
        report.excluded = screened.rejected + report.excluded
        if overflowed:
            # Finite candidates can still overflow when summed; never broadcast that.
            log(WARNING, "SoftMerge round %d: the merge overflowed; keeping the global model", server_round)
            merged = {name: tensor.clone() for name, tensor in keep.items()}
            report.fallback_units = list(report.units)
            # The report describes the model that goes out (the weight tables read it), not the discarded one.
            report.weights = [[1.0 if label == KEEP_LABEL else 0.0 for label in report.candidates]
                              for _ in report.units]
            report.loss_after, report.accuracy_after = report.loss_before, report.accuracy_before
        self.reports[server_round] = report
        self._log_report(server_round, report)
        if self.on_report is not None:
            self.on_report(server_round, report)

        metrics = aggregate_client_metrics(self, averaged, (self.label_key,))
        metrics.update(report_summary(report))
        metrics["softmerge-merge-failed"] = 0
        # As the hardened baselines report them (see :func:`softmerge.server.replies.harden`).
        metrics["replies-excluded"] = len(screened.rejected)
        # The replies with weight in the broadcast: none when every gate closed, the no-harm check
        # or the overflow guard sent the global model out again (as the hardened rules count it).
        metrics["replies-used"] = replies_in_broadcast(report)
        metrics["replies-missing"] = len(screened.missing)
        return ArrayRecord(merged), metrics

    def _record_round(self, report: GateReport, node_of: dict[str, str], server_round: int) -> None:
        """Add this round's gates to the clients' records (see :mod:`softmerge.aggregation.trust`)."""
        columns = [k for k, label in enumerate(report.candidates) if label != KEEP_LABEL and label in node_of]
        openness = relative_openness(report.gates, columns)
        if openness is None:
            return  # nothing is recorded, so no label either: labels only serve records
        if not self.trust_copies:
            # A group's gate says the shared reply is good, not that each sender produced it.
            copies = {label for group in report.duplicates for label in group}
            openness = [min(value, NEUTRAL_TRUST) if report.candidates[k] in copies else value
                        for k, value in zip(columns, openness)]
        if len(columns) > self.trust_max_records and not self._warned_about_cap:
            # Some of this very round's clients are forgotten at once: every round, with a
            # steady federation, so the record never bounds them (and the mirror test
            # treats them as newcomers). Say so once rather than do it quietly.
            log(WARNING, "SoftMerge round %d: %d clients were gated but the trust record keeps at most %d, so "
                "some are forgotten in the round they are recorded; raise softmerge-trust-max-records to at "
                "least the number of clients per round (said once per run)", server_round, len(columns),
                self.trust_max_records)
            self._warned_about_cap = True
        self.trust_record = update_record(self.trust_record, [node_of[report.candidates[k]] for k in columns],
                                          openness, self.trust_memory)
        self.trust_labels.update((node_of[report.candidates[k]], report.candidates[k]) for k in columns)
        self._forget_beyond_cap()

    def _forget_beyond_cap(self) -> None:
        """Keep the ``trust_max_records`` most recently gated records (and their labels)."""
        if len(self.trust_record) <= self.trust_max_records:
            return
        self.trust_record = forget_least_recent(self.trust_record, self.trust_max_records)
        self.trust_labels = {node: label for node, label in self.trust_labels.items() if node in self.trust_record}
        if self._unclaimed:
            self._unclaimed &= set(self.trust_record)

    def trust_state(self) -> dict[str, list]:
        """The trust record in JSON form, for checkpoints: ``{node: [opened, seen, label]}``."""
        return {node: [opened, seen, self.trust_labels.get(node, "")]
                for node, (opened, seen) in self.trust_record.items()}

    def load_trust_state(self, state: object) -> None:
        """Restore :meth:`trust_state`'s output; a malformed record is logged and ignored.

        Entries without a label (``[opened, seen]``, older checkpoints) are accepted.
        """
        record: dict[str, tuple[float, float]] = {}
        labels: dict[str, str] = {}
        try:
            for node, entry in dict(state).items():  # type: ignore[call-overload]
                opened, seen, *label = entry
                opened, seen = float(opened), float(seen)
                if not (0 <= opened <= seen and seen < 1e9) or len(label) > 1:
                    raise ValueError(f"client {node}: {entry!r}")
                record[str(node)] = (opened, seen)
                if label and isinstance(label[0], str) and label[0]:
                    labels[str(node)] = label[0]
        except (TypeError, ValueError) as error:
            log(WARNING, "SoftMerge: the checkpoint's trust record is malformed (%s); starting without one", error)
            return
        self.trust_record, self.trust_labels = record, labels
        self._unclaimed = None
        # A checkpoint from a run with a larger cap.
        if len(record) > self.trust_max_records:
            log(WARNING, "SoftMerge: the checkpoint's trust record holds %d clients and softmerge-trust-max-records "
                "is %d; the %d least recently gated are forgotten", len(record), self.trust_max_records,
                len(record) - self.trust_max_records)
        self._forget_beyond_cap()

    def _follow_restored_record(self, server_round: int, nodes: list[str], labels: list[str]) -> None:
        """Re-key a restored trust record when none of its nodes reply: a simulation that resumed.

        A simulation draws new node IDs every time it starts; its clients keep their labels.
        A record moves to the one node that now replies with its label, and a label two
        nodes claim moves to neither. The label is the client's claim, and a trusted record
        spares its holder the mirror test, so records move only with ``follow_labels`` (an
        in-process simulation, whose clients are its own); without it they stay with their
        old node IDs and the replying nodes start neutral. While any recorded node still
        replies, the record stays keyed by node ID alone.

        A client that does not reply in the first resumed round (not sampled, timed out)
        keeps its record under its old node ID, as an absent client keeps it in an
        uninterrupted run, and takes it in the first later round it replies in; so does a
        checkpoint taken before then. Only records without a label, which nothing can
        claim, are dropped.
        """
        if self._unclaimed is None:
            restored = set(self.trust_record)
            if not restored or restored.intersection(nodes):
                self._unclaimed = set()
                return
            if not self.follow_labels:
                self._unclaimed = set()
                log(WARNING, "SoftMerge round %d: none of the %d nodes in the checkpoint's trust record replied "
                    "(new node IDs, e.g. a SuperLink restarted without its database); the records stay with their "
                    "node IDs and the replying nodes start neutral (a client's label is not proof of who it is)",
                    server_round, len(restored))
                return
            unlabelled = restored - set(self.trust_labels)
            self.trust_record = {node: entry for node, entry in self.trust_record.items() if node not in unlabelled}
            self._unclaimed = restored - unlabelled
            log(WARNING, "SoftMerge round %d: none of the %d nodes in the checkpoint's trust record replied (a "
                "simulation draws new node IDs on every start); records move to the replying nodes by client "
                "label%s", server_round, len(restored),
                f", {len(unlabelled)} without a label are dropped" if unlabelled else "")
        if not self._unclaimed:
            return
        recorded_by_label = Counter(self.trust_labels[node] for node in self._unclaimed)
        node_of_label = {self.trust_labels[node]: node for node in self._unclaimed
                         if recorded_by_label[self.trust_labels[node]] == 1}
        claims = Counter(label.partition("@")[0] for label in labels)
        moved = 0
        for node, label in zip(nodes, labels):
            old_node = node_of_label.get(label)
            if old_node is not None and claims[label] == 1 and node not in self.trust_record:
                self.trust_record[node] = self.trust_record.pop(old_node)
                self.trust_labels[node] = self.trust_labels.pop(old_node)
                self._unclaimed.discard(old_node)
                moved += 1
        log(WARNING, "SoftMerge round %d: %d of the %d replying nodes took their client label's record, the "
            "rest start neutral; %d restored records wait for their client", server_round, moved, len(nodes),
            len(self._unclaimed))

    def _log_report(self, server_round: int, report: GateReport) -> None:
        log(INFO, "SoftMerge round %d: %d candidates, %d excluded, %d steps (%d skipped) in %.2fs; "
            "gate-split accuracy %.3f -> %.3f", server_round, len(report.candidates), len(report.excluded),
            report.steps, report.skipped_steps, report.seconds, report.accuracy_before, report.accuracy_after)
        if report.bend is not None:
            log(INFO, "SoftMerge round %d: the clients' updates bend the gate-split loss by %.2f nats (quantile); "
                "scored at the %s step", server_round, report.bend, "merge" if report.merge_step else "candidate")
        if report.own_step_retry:
            log(WARNING, "SoftMerge round %d: the merge-step starts harmed the gate-split loss by more than the "
                "margin; learned again from each client's own step (start: %s)", server_round, report.start)
        if report.blind_tensors and not self._warned_about_blind:
            self._warned_about_blind = True
            log(WARNING, "SoftMerge round %d: the gate split's loss does not read %s (in eval mode), so nothing can "
                "judge the clients' values of them: they keep the global model's (said once per run)", server_round,
                report.blind_tensors)
        if report.open_share is not None:
            log(INFO, "SoftMerge round %d: the merge opened %d client groups; scored again at that share (start: %s)",
                server_round, report.open_share, report.start)
        for exclusion in report.excluded:
            # Pre-selection (max_candidates) leaves out valid models by design: not a warning.
            level = INFO if exclusion.reason.startswith("pre-selection") else WARNING
            log(level, "SoftMerge round %d: excluded %s: %s", server_round, exclusion.label, exclusion.reason)
        for group in report.duplicates:
            # Honest clients with their own data do not send models that behave the same.
            log(WARNING, "SoftMerge round %d: identical or near-identical replies from %s share one gate",
                server_round, group)
        if report.rejected_loss is not None:
            if report.harm_fallback:
                outcome = "kept the global model"
            elif report.uninformed:
                outcome = (f"no start beat them, nor does the global model ({report.loss_before:.3f}): the merge "
                           f"from {report.start} stands ({report.loss_after:.3f})")
            else:
                how = "weighted by" if report.start == DIRECTION_START else "learned from"
                outcome = f"took the merge {how} {report.start}: {report.loss_after:.3f}"
            if report.rejected_over_margin:
                bar = f"is more than the no-harm margin above the global model's {report.loss_before:.3f}"
            else:
                bar = f"is no better than predicting the gate split's label frequencies ({report.constant_loss:.3f})"
            log(WARNING, "SoftMerge round %d: the merge's gate-split loss %.3f %s; %s", server_round,
                report.rejected_loss, bar, outcome)
        if report.fallback_units:
            log(WARNING, "SoftMerge round %d: every gate closed in %s; kept the previous global model there",
                server_round, report.fallback_units)
        for line in report.table().splitlines():
            log(INFO, "\t%s", line)


def _example_count(message: Message, weighted_by_key: str) -> float:
    """The example count a screened reply claims."""
    (metrics,) = message.content.metric_records.values()
    return float(metrics[weighted_by_key])


def replies_in_broadcast(report: GateReport) -> int:
    """How many client candidates hold weight in some unit of the merged model.

    Finite, well-formed replies can all end at weight 0 (every gate closed, or the no-harm
    check kept the global model), or be the global model resent unchanged; a run whose
    rounds all end so has not trained, whatever its replies looked like.
    """
    # A client that resent the global model unchanged shares the keep candidate's weight, and
    # the global model is what goes out.
    echoes = {label for group in report.duplicates if KEEP_LABEL in group for label in group}
    return sum(1 for column, label in enumerate(report.candidates)
               if label != KEEP_LABEL and label not in echoes and any(row[column] > 0 for row in report.weights))


def report_summary(report: GateReport) -> dict[str, float | int]:
    """The GateReport in MetricRecord form (scalars only)."""
    keep_share = report.weight_on(["keep"])
    return {
        "softmerge-candidates": len(report.candidates),
        "softmerge-excluded": len(report.excluded),
        "softmerge-duplicates": sum(len(group) - 1 for group in report.duplicates),
        "softmerge-steps": report.steps,
        "softmerge-skipped-steps": report.skipped_steps,
        "softmerge-seconds": float(report.seconds),
        "softmerge-gate-acc-before": float(report.accuracy_before),
        "softmerge-gate-acc-after": float(report.accuracy_after),
        "softmerge-keep-weight": float(keep_share),
        "softmerge-fallback-units": len(report.fallback_units),
        "softmerge-rejected": int(report.rejected_loss is not None),
        "softmerge-harm-fallback": int(report.harm_fallback),
        "softmerge-uninformed": int(report.uninformed),
        "softmerge-merge-step": int(report.merge_step),
        "softmerge-own-step-retry": int(report.own_step_retry),
        "softmerge-open-share": int(report.open_share or 0),
        "softmerge-attempts": report.attempts,
    }
