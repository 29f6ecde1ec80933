"""The oracle defense: the malicious clients' replies are dropped before aggregation.

Only a simulation can do this, because only a simulation knows who is malicious. FedAvg
over the honest clients alone, with no attack, is what a perfect filter would reach, so
the benchmark uses it as the yardstick for every defense.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp.strategy import FedAvg

PARTITION_KEY = "partition-id"


def reported_partition(message: Message) -> int | None:
    """The partition id a reply reports in its metrics, if any."""
    if message.has_error():
        return None
    for record in message.content.metric_records.values():
        value = record.get(PARTITION_KEY)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def exclude_partitions(strategy: FedAvg, partition_ids: Iterable[int]) -> FedAvg:
    """Make ``strategy`` aggregate only replies from partitions not in ``partition_ids``.

    The strategy instance's ``aggregate_train`` is wrapped in place (``Strategy.start``
    calls it through the instance), so the strategy class itself stays unchanged.
    """
    excluded = frozenset(partition_ids)
    aggregate_train = strategy.aggregate_train

    def aggregate_honest_replies(server_round: int, replies: Iterable[Message]):
        kept = [reply for reply in replies if reported_partition(reply) not in excluded]
        return aggregate_train(server_round, kept)

    strategy.aggregate_train = aggregate_honest_replies
    return strategy
