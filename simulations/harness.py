"""The colluding-adversary harness: omniscient attacks on any Message-API strategy.

Colluding attacks (ALIE, IPM, min-max, min-sum, Fang, Mimic; see
:mod:`softmerge.simulations.colluding`) need the benign updates of the round, which no
single ClientApp has. So they run on the server side, *in front of* the defense: the
malicious clients train honestly (backdoor-evade's train the backdoor), and before the defense's
``aggregate_train`` sees the round's replies, the harness replaces the model in each
malicious reply by ``global + crafted update``. Everything else about the reply stays as
the client sent it: metadata, record names, array keys, dtypes and shapes, and the same
MetricRecord (so ``num-examples`` and ``partition-id`` too). Honest replies are passed
through as the very same objects. The defense is never told who is malicious.

Which replies are malicious: those whose MetricRecord carries ``partition-id`` with a
value in ``malicious_ids`` (both honest and malicious ClientApps report it). Replies
without it count as honest.

How it hooks in: :meth:`ColludingAdversary.attach` (or :func:`make_colluding`) replaces
the strategy *instance's* ``configure_train`` and ``aggregate_train`` by wrappers that
call the originals. ``Strategy.start`` calls ``self.configure_train`` and
``self.aggregate_train``, so it goes through the wrappers, while the object stays an
instance of its own class: ``isinstance`` checks, ``strategy.reports``, ``summary()``,
the evaluate path and the class name in Flower's log are all unchanged. A proxy object
would not work (``start`` would call the proxied object's own methods), and a subclass
would need one per strategy class and would show up in the log.

Per round the attack uses, with ``knowledge="full"`` (the default, the omniscient
attacker of DESIGN.md), the updates of every honest reply that is readable and finite;
with ``knowledge="partial"``, only the malicious clients' own honestly trained updates.
n is the number of replies with content this round and m the number of malicious ones
rewritten, so sampling (``fraction-train`` < 1) is accounted for. Rows are ordered by
partition id, and the random draws (Fang) come from ``numpy.random.default_rng([seed,
round])``, so a run is reproducible whatever order the replies arrive in.

The adaptive ``backdoor-evade`` also needs the attacker's loss on its own clean sample of
the server's validation distribution (``loss_of``, a function of a model state; see
:func:`clean_loss_oracle`). Its malicious clients train the backdoor themselves; the
harness moves each one's own update ``u`` to ``mu + gamma * (u - mu)``, ``mu`` the mean of
the updates it knows, with the largest ``gamma`` in ``[0, n]`` whose loss stays at or
below the median of theirs (``backdoor-evade-<q>``: their q-quantile; honest replies with
``knowledge="full"``, the malicious clients' own unmoved ones with ``"partial"``).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from .colluding import (
    ADAPTIVE_ATTACKS,
    DEFAULT_MIMIC_WARMUP,
    FixedMimic,
    alie_z,
    craft_malicious_updates,
    largest_scale_within,
    parse_attack_name,
)

KNOWLEDGE = ("full", "partial")
# Attacks that deviate by the known updates' spread (sigma, or their pairwise distances):
# from one known update they have nothing to deviate by.
SPREAD_ATTACKS = frozenset({"alie", "min-max", "min-sum"})
_MISSING = object()
# Flower's object ids are SHA-256 hex digests.
OBJECT_ID_LENGTH = 64


@dataclass(frozen=True)
class RoundAttack:
    """What the adversary did in one round (for logs and tests; the defense never sees it)."""

    replies: int
    malicious: tuple[int, ...]  # partition ids whose replies were rewritten
    benign_used: int  # updates the attack was computed from
    skipped_reason: str = ""
    scales: tuple[float, ...] = ()  # backdoor-evade: each rewritten reply's gamma, in partition order
    copied: int | None = None  # mimic-fixed: the partition whose update every malicious reply carries


class ColludingAdversary:
    """Rewrites the malicious replies of each round from the benign ones.

    Parameters
    ----------
    attack : str
        A name :func:`softmerge.simulations.colluding.parse_attack_name` accepts, e.g.
        ``"alie"``, ``"ipm-0.1"``, ``"min-max-sign"``, ``"fang"``, ``"mimic"``, or the adaptive
        ``"backdoor-evade"`` / ``"backdoor-evade-<q>"`` (needs ``loss_of``).
    malicious_ids : iterable of int
        Partition ids of the malicious clients.
    seed : int
        Seeds the per-round generator of randomised attacks.
    knowledge : "full" or "partial"
        Whose updates the attack is computed from: the honest clients' (full) or the
        malicious clients' own (partial): honestly trained ones, or for backdoor-evade
        their backdoored ones, whose mean and losses then stand in for the honest ones.
    label_key : str
        MetricRecord key naming a reply's partition.
    loss_of : callable, optional
        The attacker's loss of a model state (key -> numpy array) on its own clean data;
        required by the adaptive attacks (``backdoor-evade``), ignored by the others.
    **attack_params
        Passed to the attack (e.g. ``perturbation="unit"``, ``gamma_init=50``, ``b=2``);
        backdoor-evade takes ``quantile`` (in [0, 1]), ``upper`` (the largest gamma, >= 1;
        default n) and ``iterations`` (bisection steps, >= 1).
    """

    def __init__(
        self,
        attack: str,
        malicious_ids: Iterable[int],
        seed: int = 0,
        knowledge: str = "full",
        label_key: str = "partition-id",
        loss_of: Callable[[dict[str, np.ndarray]], float] | None = None,
        statistics: Iterable[str] = (),
        **attack_params,
    ) -> None:
        kind, implied = parse_attack_name(attack)  # fails now, naming the known attacks, rather than in round 1
        if knowledge not in KNOWLEDGE:
            raise ValueError(f"knowledge must be one of {', '.join(KNOWLEDGE)}; got {knowledge!r}")
        if kind in ADAPTIVE_ATTACKS and loss_of is None:
            raise ValueError(f"{attack} keeps its replies' loss on the attacker's clean data in check: "
                             "pass loss_of")
        self.adaptive = kind in ADAPTIVE_ATTACKS
        self.kind = kind
        self.loss_of = loss_of
        if self.adaptive:
            _check_evade_params({**implied, **attack_params})
        self.attack = attack
        self.malicious_ids = frozenset(int(i) for i in malicious_ids)
        self.seed = int(seed)
        self.knowledge = knowledge
        self.label_key = label_key
        # Running statistics (BatchNorm's): not parameters, so not crafted; each malicious
        # reply keeps its own, as the baselines merge them apart (server.baselines).
        self.statistics = frozenset(statistics)
        # What the name implies, overridden by what is passed (craft_malicious_updates merges the same way).
        self.attack_params = {**implied, **attack_params}
        self._warned_alie: set[tuple[int, int]] = set()
        # mimic-fixed keeps its direction and target from round to round (and in checkpoints).
        self.mimic_tracker = (FixedMimic(self.attack_params.pop("warmup", DEFAULT_MIMIC_WARMUP))
                              if kind == "mimic-fixed" else None)
        self.history: dict[int, RoundAttack] = {}
        self._global: dict[str, np.ndarray] | None = None
        self._strategy: Strategy | None = None
        self._saved: dict[str, object] = {}

    # --- hooking into a strategy ---------------------------------------------------------

    def attach(self, strategy: Strategy) -> Strategy:
        """Wrap ``strategy``'s configure_train and aggregate_train (on the instance) and return it."""
        if self._strategy is not None:
            raise RuntimeError("this adversary is already attached to a strategy")
        configure, aggregate = strategy.configure_train, strategy.aggregate_train

        @functools.wraps(configure)
        def configure_train(server_round, arrays, config, grid):
            # aggregate_train is not given the round's starting model; the updates need it.
            self.remember_global(arrays)
            return configure(server_round, arrays, config, grid)

        @functools.wraps(aggregate)
        def aggregate_train(server_round, replies):
            return aggregate(server_round, self.rewrite(server_round, replies))

        self._saved = {name: strategy.__dict__.get(name, _MISSING) for name in ("configure_train", "aggregate_train")}
        strategy.configure_train = configure_train
        strategy.aggregate_train = aggregate_train
        self._strategy = strategy
        return strategy

    def detach(self) -> None:
        """Give the strategy back its own configure_train and aggregate_train."""
        if self._strategy is None:
            return
        for name, saved in self._saved.items():
            if saved is _MISSING:
                self._strategy.__dict__.pop(name, None)
            else:
                setattr(self._strategy, name, saved)
        self._strategy, self._saved = None, {}

    # --- the attack ----------------------------------------------------------------------

    def remember_global(self, arrays: ArrayRecord) -> None:
        """Keep the round's global model (numpy, by key) to compute updates against."""
        self._global = {key: array.numpy() for key, array in arrays.items()}

    def rewrite(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies with every malicious one's model replaced by global + crafted update."""
        replies = list(replies)
        if self._global is None:
            raise RuntimeError("no global model: configure_train must run before aggregate_train")
        with_content = [i for i, msg in enumerate(replies) if not msg.has_error() and msg.has_content()]
        honest, malicious = [], []  # (sort key, reply index, update or None)
        for index in with_content:
            partition = self._partition_of(replies[index])
            update = self._update_of(replies[index])
            entry = ((partition if partition is not None else float("inf"),
                      replies[index].metadata.src_node_id), index, update)
            (malicious if partition in self.malicious_ids else honest).append(entry)
        honest.sort(key=lambda e: e[0])
        malicious.sort(key=lambda e: e[0])

        unreadable = [e for e in malicious if e[2] is None]
        if unreadable:
            log(WARNING, "colluding %s round %d: %d malicious replies do not match the global model's "
                "arrays and are passed through unchanged", self.attack, server_round, len(unreadable))
        targets = [e for e in malicious if e[2] is not None]
        # n is what the defense can average: a reply without a model of the global's arrays
        # (a client's empty failure reply), or with a non-finite one (which the screen rejects),
        # counts for nothing there, and would shrink ALIE's z.
        finite_honest = [e for e in honest if e[2] is not None and np.isfinite(e[2]).all()]
        num_total = len(finite_honest) + len(targets)

        def skip(reason: str) -> list[Message]:
            if targets:
                log(WARNING, "colluding %s round %d: replies passed through unchanged: %s", self.attack,
                    server_round, reason)
            self.history[server_round] = RoundAttack(len(replies), (), 0, reason or "no malicious reply")
            return replies

        if not targets:
            return skip("")
        if num_total <= len(targets) and self.kind == "alie" and "z" not in self.attack_params:
            # Every other attack crafts from the attackers' own updates below, as with partial knowledge.
            return skip("every client this round is malicious, and ALIE's z needs n > m")
        finite_malicious = [e for e in targets if np.isfinite(e[2]).all()]
        usable = finite_honest if self.knowledge == "full" else finite_malicious
        if not usable and self.knowledge == "full":
            why = "every client this round is malicious" if not honest else "no readable, finite honest update"
            if self.kind in ("mimic", "mimic-fixed"):
                # Mimic copies an honest client; mimic-fixed would lock onto an attacker for good.
                return skip(f"{why}, so there is no honest client to copy")
            log(WARNING, "colluding %s round %d: %s; using the malicious clients' own updates (partial "
                "knowledge)", self.attack, server_round, why)
            usable = finite_malicious
        known = [e[2] for e in usable]
        if not known:
            return skip("no readable, finite update to compute the attack from")

        if len(known) == 1 and self.kind in SPREAD_ATTACKS:
            log(WARNING, "colluding %s round %d: one known update, so its spread is 0 and the crafted update "
                "is that update unchanged: the attack sends an honest update this round", self.attack, server_round)
        if self.kind == "alie" and "z" not in self.attack_params:
            z = alie_z(len(targets), num_total)
            if z <= 0 and (len(targets), num_total) not in self._warned_alie:
                self._warned_alie.add((len(targets), num_total))
                # DESIGN's z is 0 at m = 2 of an even n (10 clients at 20%) and at m = 1 of an odd n,
                # below 0 at m = 1 of an even n: at 0 the replies are exactly the honest mean, and a
                # table would count a non-attack as survived.
                log(WARNING, "colluding alie: with n=%d replies and m=%d malicious, z = Phi^-1((n-m-s)/(n-m)) "
                    "= %.3f: the crafted update mu + z*sigma is %s at this setting", num_total, len(targets), z,
                    "the mean of the known updates, no deviation" if z == 0
                    else "on the other side of the mean from the usual ALIE")
        scales: tuple[float, ...] = ()
        if self.adaptive:
            crafted, scales = self._moved_own_updates(targets, usable, replies, num_total)
        else:
            tracking = {}
            if self.mimic_tracker is not None:
                # The target is followed by partition id from round to round; a reply without one
                # cannot be followed, so it is never the one copied.
                labelled = [e for e in usable if e[0][0] != float("inf")]
                if not labelled:
                    return skip("no known update names its partition, so mimic-fixed has no client to follow")
                known = [e[2] for e in labelled]
                tracking = {"tracker": self.mimic_tracker, "labels": [int(key[0]) for key, _, _ in labelled]}
            crafted = craft_malicious_updates(
                self.attack, np.stack(known), len(targets), num_total,
                rng=np.random.default_rng([self.seed, server_round]), **self.attack_params, **tracking)
        rewritten = list(replies)
        for (_, index, _), update in zip(targets, crafted):
            rewritten[index] = self._with_update(replies[index], update)
        ids = tuple(int(key[0]) for key, _, _ in targets)
        copied = None if self.mimic_tracker is None else self.mimic_tracker.last_copied
        self.history[server_round] = RoundAttack(len(replies), ids, len(known), scales=scales, copied=copied)
        log(INFO, "colluding %s round %d: rewrote the replies of partitions %s from %d updates (n=%d, m=%d)%s%s",
            self.attack, server_round, list(ids), len(known), num_total, len(targets),
            f"; scales {[round(gamma, 4) for gamma in scales]}" if scales else "",
            f"; copying partition {copied}" if copied is not None else "")
        return rewritten

    def _moved_own_updates(self, targets: list, usable: list, replies: list[Message],
                           num_total: int) -> tuple[list[np.ndarray], tuple[float, ...]]:
        """backdoor-evade: each malicious update moved from the known mean as far as its clean loss allows.

        Every loss is of a model as it is sent: a known reply with its own running statistics,
        a crafted one with those of the attacker's reply it replaces (a BatchNorm model's loss
        depends on them).
        """
        params = self.attack_params
        known = [update for _, _, update in usable]
        losses = [loss for loss in (self.loss_of(self._state_of(update, replies[index])) for _, index, update in usable)
                  if math.isfinite(loss)]
        mean = np.mean(known, axis=0)
        if not losses:
            # No bound to stay within: send the backdoors as trained rather than guess one.
            log(WARNING, "colluding %s: no known update has a finite clean loss; the backdoors go as trained",
                self.attack)
            return [update for _, _, update in targets], tuple(1.0 for _ in targets)
        threshold = float(np.quantile(losses, float(params.get("quantile", 0.5))))
        upper = float(params.get("upper", num_total))
        iterations = int(params.get("iterations", 12))
        crafted, scales = [], []
        for _, index, update in targets:
            if not np.isfinite(update).all():
                crafted.append(mean.copy())  # nothing of it can be sent: the known mean instead
                scales.append(0.0)
                continue
            direction = update - mean
            if not direction.any():
                # Its own update is the mean (partial knowledge, one client): moving it changes nothing.
                crafted.append(update)
                scales.append(1.0)
                continue
            gamma = largest_scale_within(
                lambda g, d=direction, sent=replies[index]: self.loss_of(self._state_of(mean + g * d, sent)),
                threshold, upper, iterations=iterations)
            crafted.append(mean + gamma * direction)
            scales.append(gamma)
        if 0.0 in scales and not self.loss_of(self._state_of(mean)) <= threshold:
            # gamma = 0 is also what "nothing passed" returns: say which it was.
            log(INFO, "colluding %s: even the known mean's clean loss is above the bound; it is sent as is",
                self.attack)
        return crafted, tuple(scales)

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        """What the adversary carries from round to round (mimic-fixed's direction and target), by name."""
        return {} if self.mimic_tracker is None else self.mimic_tracker.to_arrays()

    def restore_checkpoint_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Take back :meth:`checkpoint_arrays`' output; a malformed one is logged, and the attack starts afresh."""
        if self.mimic_tracker is None or not arrays:
            return
        try:
            self.mimic_tracker.load_arrays(arrays)
        except ValueError as problem:
            log(WARNING, "colluding %s: the checkpoint's attack state is unusable (%s); its warm-up starts over",
                self.attack, problem)

    # --- reading and writing replies -----------------------------------------------------

    def _partition_of(self, msg: Message) -> int | None:
        for record in msg.content.metric_records.values():
            value = record.get(self.label_key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return int(value)
        return None

    def _floating_keys(self) -> list[str]:
        return [key for key, value in self._global.items()
                if np.issubdtype(value.dtype, np.floating) and key not in self.statistics]

    def _update_of(self, msg: Message) -> np.ndarray | None:
        """The reply's floating arrays minus the global model's, flattened in the global key order.

        None when the reply does not hold exactly one ArrayRecord with the global model's
        keys, floating dtypes and shapes: such a reply is not an update we can read or write.
        """
        records = list(msg.content.array_records.values())
        if len(records) != 1 or set(records[0].keys()) != set(self._global):
            return None
        parts = []
        try:
            for key in self._floating_keys():
                values = records[0][key].numpy()
                if values.shape != self._global[key].shape or not np.issubdtype(values.dtype, np.floating):
                    return None
                parts.append(values.astype(np.float64).ravel() - self._global[key].astype(np.float64).ravel())
        except (TypeError, ValueError):  # an array that does not deserialise is unreadable
            return None
        return np.concatenate(parts) if parts else np.zeros(0)

    def _offsets(self) -> dict[str, tuple[int, int]]:
        """Where each floating array of the global model sits in a flattened update."""
        offsets, start = {}, 0
        for key in self._floating_keys():
            size = self._global[key].size
            offsets[key], start = (start, start + size), start + size
        return offsets

    def _state_of(self, update: np.ndarray, sent: Message | None = None) -> dict[str, np.ndarray]:
        """The model state global + update, in the global model's dtypes.

        Buffers (running statistics, counters) are the global model's, or with ``sent`` (a
        readable reply) that reply's own, as :meth:`_with_update` keeps them.
        """
        offsets = self._offsets()
        own = {} if sent is None else next(iter(sent.content.array_records.values()))
        state = {}
        for key, array in self._global.items():
            if key in offsets:
                low, high = offsets[key]
                array = (array.astype(np.float64).ravel() + update[low:high]).reshape(array.shape).astype(array.dtype)
            elif key in own:
                array = own[key].numpy()
            state[key] = array
        return state

    def _with_update(self, msg: Message, update: np.ndarray) -> Message:
        """A copy of ``msg`` whose floating arrays are global + update, in the reply's own dtypes."""
        (record_name, record), = msg.content.array_records.items()
        offsets = self._offsets()
        arrays = {}
        for key, array in record.items():
            if key not in offsets:
                arrays[key] = array  # integer buffers and running statistics stay as the client sent them
                continue
            low, high = offsets[key]
            original = array.numpy()
            values = self._global[key].astype(np.float64).ravel() + update[low:high]
            arrays[key] = Array(values.reshape(original.shape).astype(original.dtype))
        content = RecordDict({name: ArrayRecord(arrays) if name == record_name else value
                              for name, value in msg.content.items()})
        # Same sender, ids and timestamps as the real reply: only the model differs.
        rewritten = Message(content, metadata=copy.deepcopy(msg.metadata))
        message_id = msg.metadata.message_id
        # A deployment's SuperNode ids a reply by its content's hash (Flower's push_message
        # does so); a rewritten reply keeping the old id would be told apart by it alone. The
        # length test spares a simulation (uuid ids) hashing every model.
        if len(message_id) == OBJECT_ID_LENGTH and message_id == msg.object_id:
            rewritten.metadata.__dict__["_message_id"] = rewritten.object_id
        return rewritten


def _check_evade_params(params: dict) -> None:
    """backdoor-evade's parameters: known names, values in range (else a ValueError now, not in round 1)."""
    unknown = set(params) - {"quantile", "upper", "iterations"}
    if unknown:
        raise ValueError(f"backdoor-evade takes quantile, upper and iterations; got {', '.join(sorted(unknown))}")
    checks = {"quantile": lambda v: 0 <= v <= 1, "upper": lambda v: math.isfinite(v) and v >= 1,
              "iterations": lambda v: v >= 1 and float(v).is_integer()}
    for name, value in params.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and checks[name](value)):
            raise ValueError(f"backdoor-evade: {name}={value!r} is out of range")


def make_colluding(
    strategy: Strategy,
    attack: str,
    malicious_ids: Iterable[int],
    seed: int = 0,
    knowledge: str = "full",
    **attack_params,
) -> ColludingAdversary:
    """Attach a :class:`ColludingAdversary` to ``strategy`` (modified in place) and return the adversary.

    ``attack_params`` go to the adversary: ``loss_of`` (required by backdoor-evade) and the
    attack's own parameters.

    Keep using ``strategy`` as before (``strategy.start(...)``); the adversary's
    ``history`` records what it did each round, and ``detach()`` undoes the wrapping.
    """
    adversary = ColludingAdversary(attack, malicious_ids, seed=seed, knowledge=knowledge, **attack_params)
    adversary.attach(strategy)
    return adversary


def clean_loss_oracle(model: torch.nn.Module, data) -> Callable[[dict[str, np.ndarray]], float]:
    """The attacker's mean cross-entropy of a model state on its own clean sample ``data`` (an ArraySet).

    ``model`` is the attacker's copy of the architecture; each call loads the state into it.
    """
    from .tasks import evaluate_model

    def loss_of(state: dict[str, np.ndarray]) -> float:
        # reshape: ascontiguousarray would give a 0-d buffer (BatchNorm's batch count) a dimension.
        model.load_state_dict({key: torch.from_numpy(np.ascontiguousarray(value).reshape(np.shape(value)))
                               for key, value in state.items()})
        return evaluate_model(model, data)[0]

    return loss_of
