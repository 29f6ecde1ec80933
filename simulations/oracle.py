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
    configure_train, aggregate_train = strategy.configure_train, strategy.aggregate_train
    round_instructions: dict[str, list[Message]] = {}

    def remember_instructions(server_round: int, *args, **kwargs):
        # The strategies keep this very list to tell which nodes never replied (see
        # softmerge.server.replies.screen_replies).
        round_instructions["train"] = configure_train(server_round, *args, **kwargs)
        return round_instructions["train"]

    def aggregate_honest_replies(server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        kept = [reply for reply in replies if reported_partition(reply) not in excluded]
        dropped = {reply.metadata.reply_to_message_id for reply in replies if reported_partition(reply) in excluded}
        sent = round_instructions.get("train")
        if dropped and isinstance(sent, list):
            # A dropped reply came: its node must not read as one that never answered.
            sent[:] = [message for message in sent if message.metadata.message_id not in dropped]
        return aggregate_train(server_round, kept)

    strategy.configure_train = remember_instructions
    strategy.aggregate_train = aggregate_honest_replies
    return strategy
