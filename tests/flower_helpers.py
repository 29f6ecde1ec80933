"""Hand-built Flower messages for strategy tests, without a running SuperLink."""

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict


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


class EchoGrid(StubGrid):
    """A Grid whose nodes reply to each train message with the global model plus seeded noise.

    ``kill_in_train_round`` raises KeyboardInterrupt when that train round is sent: a run
    killed mid-round, for resume tests that need no SuperLink.
    """

    def __init__(self, count: int = 4, kill_in_train_round: int | None = None):
        super().__init__(range(101, 101 + count))
        self.train_rounds, self.kill_in_train_round = 0, kill_in_train_round

    def send_and_receive(self, messages, timeout=None):
        import numpy as np

        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            self.train_rounds += 1
            if self.train_rounds == self.kill_in_train_round:
                raise KeyboardInterrupt(f"killed in train round {self.train_rounds}")
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            noise = np.random.default_rng(1000 * node + self.train_rounds)
            state = {name: array.numpy() for name, array in message.content["arrays"].items()}
            state = {name: value + noise.normal(0, 0.01, value.shape).astype(value.dtype)
                     if np.issubdtype(value.dtype, np.floating) else value for name, value in state.items()}
            metrics = MetricRecord({"train-loss": 0.5, "num-examples": 100, "partition-id": node - 101})
            arrays = ArrayRecord({name: Array(value) for name, value in state.items()})
            replies.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message))
        return replies
