"""The ClientApp: honest local training, and the client-side attacks chosen by run config.

Each node reads its partition from ``node_config`` (``partition-id``, ``num-partitions``)
and everything else from the run config (see :mod:`softmerge.simulations.config`). A
node whose partition id is listed in ``malicious-partitions`` applies ``attack`` to what
it sends. Honest and malicious replies carry the same record keys, so nothing in the
reply's shape gives an attacker away.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from logging import WARNING

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from ..aggregation.candidates import running_statistics
from ..simulations.config import (
    CLIENT_ATTACKS,
    ConfigError,
    RunSettings,
    malicious_per_round,
    parse_run_config,
    partition_data,
    replies_per_round,
    task_data,
    trains_backdoor,
)
from ..simulations.tasks import (
    ArraySet,
    build_model,
    evaluate_model,
    poison_with_backdoor,
    train_model,
)
from .attacks import flip_labels, poison_state

# Simulated clients run in parallel actors on a small machine; one thread each avoids
# oversubscribing the cores.
torch.set_num_threads(1)

app = ClientApp()


def node_partition(node_config: Mapping[str, object]) -> tuple[int, int]:
    """(partition id, number of partitions) from the node config, or a ConfigError that names the keys.

    A SuperNode started without them (``flower-supernode --node-config
    "partition-id=0 num-partitions=2"``) would otherwise fail with a bare ``KeyError``.
    """
    values = []
    for key in ("partition-id", "num-partitions"):
        value = node_config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"node config '{key}' is {'missing' if value is None else repr(value)}: start the "
                              "node with --node-config \"partition-id=<id> num-partitions=<n>\"")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not number.is_integer():
            raise ConfigError(f"node config '{key}' must be an integer, got {value!r}")
        values.append(int(number))
    partition_id, num_partitions = values
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise ConfigError(f"node config needs 0 <= partition-id < num-partitions, got partition-id={partition_id} "
                          f"num-partitions={num_partitions}")
    return partition_id, num_partitions


def _local_data(settings: RunSettings, context: Context) -> tuple[int, int, ArraySet, ArraySet]:
    partition_id, num_partitions = node_partition(context.node_config)
    data = partition_data(settings, partition_id, num_partitions)
    return partition_id, num_partitions, *split_held_out(data)


def split_held_out(data: ArraySet) -> tuple[ArraySet, ArraySet]:
    """(train, held out): a fixed fifth of the partition is held out for federated evaluation."""
    cut = max(1, len(data) * 4 // 5) if len(data) > 1 else len(data)
    return ArraySet(data.x[:cut], data.y[:cut]), ArraySet(data.x[cut:], data.y[cut:])


def message_round(config: Mapping[str, object]) -> int:
    """The train message's ``server-round``, which seeds local training: an integer >= 0, or a ConfigError.

    Flower's strategies always send it; without it every round would reuse one seed, so
    round 0's is used with a warning. A fractional round would silently share a seed with
    another round, and a negative one fails deep in numpy's seeding.
    """
    if "server-round" not in config:
        log(WARNING, "train message without config 'server-round': round 0's seed is used for local training")
        return 0
    value = config["server-round"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"train message config 'server-round' must be an integer >= 0, got {value!r}")
    return value


def local_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's local training (and poisoning) in one round."""
    return run_seed * 1_000_003 + server_round * 1_009 + partition_id


@app.train()
def train(msg: Message, context: Context) -> Message:
    return train_reply(msg, context, parse_run_config(context.run_config))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return evaluate_reply(msg, context, parse_run_config(context.run_config))


def make_client_app(settings: RunSettings) -> ClientApp:
    """A ClientApp bound to fixed settings, for in-process simulations that set no run config."""
    bound = ClientApp()
    bound.train()(lambda msg, context: train_reply(msg, context, settings))
    bound.evaluate()(lambda msg, context: evaluate_reply(msg, context, settings))
    return bound


def simulated_failure(settings: RunSettings, seed: int) -> str | None:
    """Whether this client fails this round (``client-failure-rate``), and how."""
    if settings.client_failure_rate <= 0:
        return None
    draw = random.Random(seed)
    if draw.random() >= settings.client_failure_rate:
        return None
    if settings.client_failure_mode == "mixed":
        return draw.choice(("raise", "timeout", "empty"))
    return settings.client_failure_mode


def train_reply(msg: Message, context: Context, settings: RunSettings) -> Message:
    """Train on this node's partition; a malicious node then poisons what it sends."""
    partition_id, num_partitions, train_set, _ = _local_data(settings, context)
    config = msg.content["config"] if "config" in msg.content.config_records else {}
    server_round = message_round(config)
    seed = local_seed(settings.seed, server_round, partition_id)
    failure = simulated_failure(settings, seed)
    if failure == "raise":
        raise RuntimeError(f"simulated client failure (partition {partition_id}, round {server_round})")
    if failure == "empty":
        return Message(content=RecordDict({}), reply_to=msg)
    if failure == "timeout":
        # Reply only after the server has stopped waiting for this round.
        time.sleep(settings.round_timeout + 1.0)

    model = build_model(settings.dataset)
    global_state = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(global_state)

    # Colluding attacks are crafted by the simulation harness from honest replies, so
    # their clients train honestly here; backdoor-evade's train the backdoor, which the
    # harness then moves.
    malicious = partition_id in settings.malicious_ids and (
        settings.attack in CLIENT_ATTACKS[1:] or trains_backdoor(settings.attack))
    if malicious and settings.attack == "label-flip":
        num_classes = task_data(settings).num_classes
        train_set = ArraySet(train_set.x, flip_labels(train_set.y, num_classes))
    if malicious and trains_backdoor(settings.attack):
        train_set = poison_with_backdoor(train_set, settings.backdoor_target, settings.backdoor_fraction, seed)
    torch.manual_seed(seed)
    train_loss = train_model(model, train_set, epochs=settings.local_epochs, learning_rate=settings.learning_rate,
                             batch_size=settings.batch_size, seed=seed)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}

    if malicious:
        rank = sorted(settings.malicious_ids).index(partition_id)
        # Model replacement's gamma is the number of updates the server averages, which is
        # fewer than the partitions when a round samples (fraction-train < 1).
        averaged_per_round = float(replies_per_round(settings, num_partitions))
        attack = settings.attack
        if attack == "extreme":
            factors = settings.extreme_factors
            scale = factors[rank % len(factors)]
        elif attack == "backdoor":
            # Model replacement boost: global + gamma * (backdoored - global), when asked for.
            attack, scale = ("scaling", settings.backdoor_boost) if settings.backdoor_boost > 0 else ("none", 1.0)
        elif attack == "backdoor-replace":
            # Bagdasaryan et al.'s model replacement: the average of n replies becomes the backdoored
            # model when its senders boost by n altogether, so each of m boosts by n / m (their
            # gamma = n is one attacker's); every attacker boosting by n would overshoot m-fold
            # and wreck the model instead of planting the backdoor.
            scale = settings.backdoor_boost or averaged_per_round / malicious_per_round(settings, num_partitions)
            attack = "scaling"
        elif attack not in CLIENT_ATTACKS:
            attack, scale = "none", 1.0  # backdoor-evade(-<q>): the harness moves the trained backdoor
        else:
            scale = settings.attack_scale or averaged_per_round
        state = poison_state(attack, global_state, state, scale=scale, std=settings.gaussian_std,
                             generator=torch.Generator().manual_seed(seed), statistics=running_statistics(model))

    claimed = len(train_set)
    if partition_id in settings.malicious_ids and settings.attack != "none" and settings.attack_claimed_examples:
        # Count inflation: weighted rules (FedAvg's, SoftMerge's example weights) trust the count.
        claimed = settings.attack_claimed_examples
    metrics = MetricRecord({
        "train-loss": float(train_loss),
        "num-examples": claimed,
        # Reported so that simulations can score detection; the defense never uses it.
        "partition-id": partition_id,
    })
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


def evaluate_reply(msg: Message, context: Context, settings: RunSettings) -> Message:
    """Loss and accuracy of the received model on this node's held-out fifth."""
    _, _, _, eval_set = _local_data(settings, context)
    model = build_model(settings.dataset)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy = evaluate_model(model, eval_set)
    metrics = MetricRecord({"eval-loss": float(loss), "eval-acc": float(accuracy), "num-examples": len(eval_set)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
