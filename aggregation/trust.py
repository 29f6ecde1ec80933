"""Trust carried over rounds: a client's gate record as a prior on its next gate.

Soft merging judges a round's candidates on the gate split alone. Some attacks are refused
round after round by a margin that shrinks as the global model converges: a backdoor
trained into a patch that clean images never light up costs about a nat of clean loss
early on and nothing by round 25, and from then on one round's gate split cannot tell it
from an honest model (docs/benchmarks.md, "the backdoor at 60%"). The rounds before can.
This module keeps that record and turns it into a bound on the next start.

The record. Each time client c is gated, with ``r_c`` its gate relative to the round's
most open client gate (mean over merge units, in [0, 1]), the discounted counts become

    opened_c <- rho * opened_c + r_c,     seen_c <- rho * seen_c + 1,

with ``rho`` the memory (0.9: about the last ten rounds). A round in which every client
gate is closed says nothing about any one of them and is not recorded. The trust is the
posterior mean of the open rate under a uniform Beta(1, 1) prior,

    t_c = (opened_c + 1) / (seen_c + 2),

so a client never seen has t = 1/2.

The bound. Client c's gate starts no higher than

    init_log_alpha + s * min(0, logit(t_c)),

``s`` the strength (log_alpha per unit of log-odds). A client with no record, or one open
in half its recent rounds or more, is not bounded: it starts where its own gate-split loss
(and the mirror test) puts it. One refused in most of them starts lower, in proportion to
the log-odds of its record; with s = 2 and rho = 0.9 a client refused in every round
starts below the closed threshold after 16 rounds (seen -> 1 / (1 - rho) = 10 bounds
its trust below by 1/12, a start of 2 - 2 ln 11 = -2.8). The bound moves the start only:
gate learning may still open the gate as far as the candidate's own evidence allows (the
warm-start ceiling), so an honest client with unusual data that the record holds down is
let back in when the gate split says it helps.

Size. A record is kept for every client ever gated, and a client that leaves for good (or
is handed a new node ID) leaves its entry behind, so a long deployment with churn would
grow it without end. The record is therefore ordered by when each client was last gated,
and :func:`forget_least_recent` keeps only the most recent entries: a client forgotten
this way starts neutral if it returns, as one re-registering under a new node ID does.
Pushing a trusted honest client's record out would take as many new node IDs gated between
two of its rounds as the cap (100,000 by default).

Identity. The strategy keys the record by Flower node ID, which a client cannot choose; a
client that re-registers under a new ID starts with no record (the bound never punishes a
newcomer; it only keeps a client refused round after round from getting in once its
updates start to look clean).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# A client never seen has this trust; at or above it there is no bound.
NEUTRAL_TRUST = 0.5


def relative_openness(gates: Sequence[Sequence[float]], client_columns: Sequence[int]) -> list[float] | None:
    """Each client's gate (mean over units) over the most open client's, or None if all are closed.

    ``gates[u][k]`` is the deterministic gate of candidate k in unit u; ``client_columns``
    are the columns that are clients (the keep candidate is not one).
    """
    if not gates or not client_columns:
        return None
    means = [sum(float(row[k]) for row in gates) / len(gates) for k in client_columns]
    # Over a list holding a nan, max() answers by where the nan sits.
    top = max((value for value in means if math.isfinite(value)), default=math.nan)
    if not math.isfinite(top) or top <= 0:
        return None
    return [min(1.0, max(0.0, value / top)) if math.isfinite(value) else 0.0 for value in means]


def update_record(record: dict[str, tuple[float, float]], clients: Sequence[str], openness: Sequence[float] | None,
                  memory: float) -> dict[str, tuple[float, float]]:
    """The record after one round: ``record[c] = (opened, seen)``, discounted by ``memory``.

    Clients not gated this round keep their entry unchanged. The clients gated this round
    move to the end, in the order given, so the dict runs from the least to the most
    recently gated (what :func:`forget_least_recent` relies on). Returns a new dict.
    """
    updated = dict(record)
    if openness is None:
        return updated
    for client, value in zip(clients, openness):
        opened, seen = record.get(client, (0.0, 0.0))
        updated.pop(client, None)
        updated[client] = (memory * opened + float(value), memory * seen + 1.0)
    return updated


def forget_least_recent(record: dict[str, tuple[float, float]], max_records: int) -> dict[str, tuple[float, float]]:
    """The last ``max_records`` entries of a record ordered by :func:`update_record`; a new dict."""
    if max_records < 1:
        raise ValueError(f"max_records must be at least 1, got {max_records!r}")
    if len(record) <= max_records:
        return dict(record)
    return dict(list(record.items())[-max_records:])


def trust_of(record: Mapping[str, tuple[float, float]], client: str) -> float:
    """Posterior mean open rate, (opened + 1) / (seen + 2); 1/2 for a client with no record."""
    opened, seen = record.get(client, (0.0, 0.0))
    return (opened + 1.0) / (seen + 2.0)


def trust_bound(trust: float, init_log_alpha: float, strength: float) -> float:
    """The highest starting log_alpha the record allows: init + strength * min(0, logit(trust))."""
    trust = min(max(float(trust), 1e-6), 1.0 - 1e-6)
    return init_log_alpha + strength * min(0.0, math.log(trust / (1.0 - trust)))
