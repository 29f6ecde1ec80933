"""Hand-built Flower messages for strategy tests, without a running SuperLink."""

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict


class StubGrid:
    """Just enough of a Grid for ``configure_train`` to sample nodes."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def make_reply(node_id, state=None, error=None, partition=None, extra_arrays=False, num_examples=100):
    """A train reply from ``node_id``: an error, or ``state`` with the usual metrics."""
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node_id, message_type="train")
    if error is not None:
        return Message(Error(code=1, reason=error), reply_to=instruction)
    records = {"arrays": ArrayRecord(state)}
    if extra_arrays:
        records["more"] = ArrayRecord(state)
    metrics = {"train-loss": 0.5, "num-examples": num_examples}
    if partition is not None:
        metrics["partition-id"] = partition
    records["metrics"] = MetricRecord(metrics)
    return Message(RecordDict(records), reply_to=instruction)
