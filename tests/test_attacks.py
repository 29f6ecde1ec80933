"""Client-side attacks against their formulas (DESIGN.md section 4)."""

import math

import numpy as np
import pytest
import torch

from softmerge.client.attacks import flip_labels, poison_state

GLOBAL = {"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor(5)}
TRAINED = {"w": torch.tensor([1.5, 1.0, 3.0]), "n": torch.tensor(7)}


def test_sign_flip_sends_global_minus_update():
    sent = poison_state("sign-flip", GLOBAL, TRAINED)
    assert sent["w"].tolist() == [0.5, 3.0, 3.0]
    assert int(sent["n"]) == 7


def test_scaling_sends_global_plus_gamma_update():
    sent = poison_state("scaling", GLOBAL, TRAINED, scale=10.0)
    assert sent["w"].tolist() == [6.0, -8.0, 3.0]


def test_extreme_factors_and_non_finite_values():
    assert poison_state("extreme", GLOBAL, TRAINED, scale=1e30)["w"][0].item() == torch.tensor(1.0 + 0.5e30).item()
    assert torch.isinf(poison_state("extreme", GLOBAL, TRAINED, scale=math.inf)["w"]).all()
    assert torch.isnan(poison_state("extreme", GLOBAL, TRAINED, scale=math.nan)["w"]).all()


def test_gaussian_sends_global_plus_noise_of_the_given_std():
    big_global = {"w": torch.zeros(100_000)}
    sent = poison_state("gaussian", big_global, big_global, std=2.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(sent["w"].std()) - 2.0) < 0.05 and abs(float(sent["w"].mean())) < 0.05


def test_label_flip_maps_l_to_c_minus_1_minus_l():
    assert flip_labels(np.arange(10), 10).tolist() == list(range(9, -1, -1))


def test_layer_stealth_poisons_only_the_output_layer():
    global_state = {"fc1.weight": torch.zeros(2, 2), "fc1.bias": torch.zeros(2), "fc2.weight": torch.zeros(1, 2)}
    trained = {k: v + 1.0 for k, v in global_state.items()}
    sent = poison_state("layer-stealth", global_state, trained, scale=5.0)
    assert torch.equal(sent["fc1.weight"], trained["fc1.weight"]) and torch.equal(sent["fc1.bias"], trained["fc1.bias"])
    assert sent["fc2.weight"].tolist() == [[-5.0, -5.0]]
    # A model whose own tensors come last (a bare nn.Linear): they are the output layer.
    top_level = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    sent = poison_state("layer-stealth", top_level, {k: v + 1.0 for k, v in top_level.items()}, scale=5.0)
    assert sent["weight"].tolist() == [[-5.0, -5.0]] and sent["bias"].tolist() == [-5.0]
    nested = {"head.weight": torch.zeros(1), "weight": torch.zeros(1)}
    sent = poison_state("layer-stealth", nested, {k: v + 1.0 for k, v in nested.items()}, scale=5.0)
    assert sent["head.weight"].tolist() == [1.0] and sent["weight"].tolist() == [-5.0]


def test_backdoor_trigger_relabels_a_fraction_and_is_measurable(digits_task):
    from softmerge.simulations.tasks import (
        ArraySet,
        apply_trigger,
        attack_success_rate,
        build_model,
        poison_with_backdoor,
    )

    stamped = apply_trigger(digits_task.test.x[:3])
    assert (stamped.reshape(-1, 8, 8)[:, -2:, -2:] == 1.0).all()
    assert np.array_equal(stamped.reshape(-1, 8, 8)[:, :6], digits_task.test.x[:3].reshape(-1, 8, 8)[:, :6])
    poisoned = poison_with_backdoor(ArraySet(digits_task.pool.x, digits_task.pool.y), target=0, fraction=0.5, seed=0)
    changed = (poisoned.x != digits_task.pool.x).any(axis=1)
    assert 0.4 < changed.mean() < 0.6 and (poisoned.y[changed] == 0).all()
    images = apply_trigger(np.zeros((2, 1, 28, 28), dtype=np.float32))
    assert images[:, :, -3:, -3:].min() == 1.0 and images[:, :, :-3].max() == 0.0
    asr = attack_success_rate(build_model("digits"), digits_task.test, target=0)
    assert 0.0 <= asr <= 1.0

    class TriggerReader(torch.nn.Module):
        """Says ``target`` exactly when the bottom-right patch is at full intensity, else ``other``."""

        def __init__(self, target, other):
            super().__init__()
            self.target, self.other = target, other

        def forward(self, x):
            stamped = (x.reshape(-1, 8, 8)[:, -2:, -2:] == 1.0).flatten(1).all(dim=1)
            return torch.nn.functional.one_hot(torch.where(stamped, self.target, self.other), 10).float()

    # Only triggered images that are not already of the target class count, and each of them is read.
    assert attack_success_rate(TriggerReader(target=3, other=5), digits_task.test, target=3) == 1.0
    assert attack_success_rate(TriggerReader(target=5, other=3), digits_task.test, target=3) == 0.0
    class_three = ArraySet(digits_task.test.x[digits_task.test.y == 3], digits_task.test.y[digits_task.test.y == 3])
    assert attack_success_rate(TriggerReader(target=3, other=5), class_three, target=3) == 0.0


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("partition", "attack", "inflated"), [(3, "scaling", True), (1, "scaling", False),
                                                            (3, "none", False)])
def test_only_a_malicious_client_claims_the_inflated_example_count(partition, attack, inflated):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from softmerge.client.app import split_held_out, train_reply
    from softmerge.simulations.config import parse_run_config, partition_data
    from softmerge.simulations.tasks import build_model

    settings = parse_run_config({"attack": attack, "malicious-partitions": "3", "attack-claimed-examples": 10**6,
                                 "local-epochs": 1, "attack-scale": 1.0})
    context = Context(run_id=1, node_id=partition + 1, node_config={"partition-id": partition, "num-partitions": 4},
                      state=RecordDict(), run_config={})
    instruction = Message(RecordDict({"arrays": ArrayRecord(build_model(settings.dataset).state_dict()),
                                      "config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=partition + 1, message_type="train")
    reply = train_reply(instruction, context, settings)
    true_count = len(split_held_out(partition_data(settings, partition, 4))[0])
    assert reply.content["metrics"]["num-examples"] == (10**6 if inflated else true_count)


def _trained_reply(attack, partition=3, num_partitions=4, **run_config):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from softmerge.client.app import train_reply
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.tasks import build_model

    settings = parse_run_config({"attack": attack, "malicious-partitions": "3", "local-epochs": 1, **run_config})
    context = Context(run_id=1, node_id=partition + 1,
                      node_config={"partition-id": partition, "num-partitions": num_partitions},
                      state=RecordDict(), run_config={})
    instruction = Message(RecordDict({"arrays": ArrayRecord(build_model(settings.dataset).state_dict()),
                                      "config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=partition + 1, message_type="train")
    return train_reply(instruction, context, settings).content["arrays"].to_torch_state_dict()


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("attack", "explicit_boost"), [("scaling", "attack-scale"),
                                                        ("backdoor-replace", "backdoor-boost")])
def test_model_replacement_boosts_by_the_clients_a_round_averages_not_the_partitions(attack, explicit_boost):
    # 8 partitions at fraction-train 0.5: Flower averages 4 replies a round, so gamma = 4.
    sampled = _trained_reply(attack, num_partitions=8, **{"fraction-train": 0.5})
    by_hand = _trained_reply(attack, num_partitions=8, **{explicit_boost: 4.0})
    every_partition = _trained_reply(attack, num_partitions=8, **{explicit_boost: 8.0})
    assert all(torch.allclose(sampled[name], by_hand[name]) for name in by_hand)
    assert not all(torch.allclose(sampled[name], every_partition[name]) for name in by_hand)
    # With every client in every round the boost is still the number of partitions.
    full = _trained_reply(attack, num_partitions=8)
    assert all(torch.allclose(full[name], every_partition[name]) for name in by_hand)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("malicious", "fraction", "gamma"), [("3", 1.0, 8.0), ("1,3", 1.0, 4.0), ("0,1,2,3", 1.0, 2.0),
                                                              ("0,1,2,3", 0.5, 2.0), ("1,3", 0.5, 4.0)])
def test_model_replacement_shares_the_boost_among_the_attackers(malicious, fraction, gamma):
    # m attackers among the n replies a round averages boost by n / m each, so the average is
    # the backdoored model itself (Bagdasaryan et al.'s gamma = n is one attacker's). At
    # fraction-train 0.5, 4 of 8 partitions reply: 2 of them malicious on average with 4 attackers.
    from softmerge.simulations.config import malicious_per_round, parse_run_config, replies_per_round

    settings = parse_run_config({"malicious-partitions": malicious, "fraction-train": fraction})
    assert replies_per_round(settings, 8) / malicious_per_round(settings, 8) == gamma
    boosted = _trained_reply("backdoor-replace", num_partitions=8,
                             **{"malicious-partitions": malicious, "fraction-train": fraction})
    by_hand = _trained_reply("backdoor-replace", num_partitions=8, **{"malicious-partitions": malicious,
                                                                      "backdoor-boost": gamma})
    assert all(torch.allclose(boosted[name], by_hand[name]) for name in by_hand)
    # The plain scaling attack still boosts every attacker by n: it means to dominate the average.
    scaled = _trained_reply("scaling", num_partitions=8, **{"malicious-partitions": malicious})
    by_n = _trained_reply("scaling", num_partitions=8, **{"malicious-partitions": malicious, "attack-scale": 8.0})
    assert all(torch.allclose(scaled[name], by_n[name]) for name in by_n)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("attack", "same_as"), [("backdoor-evade", "backdoor"), ("backdoor-evade-1", "backdoor"),
                                                 ("alie", "none"), ("mimic", "none")])
def test_a_malicious_client_trains_what_its_attack_needs_and_leaves_the_rest_to_the_harness(attack, same_as):
    # backdoor-evade's clients send the backdoor as trained (the harness moves it); colluding
    # attacks' clients train honestly. Same partition and seed, so the same model.
    reply, reference = _trained_reply(attack), _trained_reply(same_as)
    assert all(torch.equal(reply[name], reference[name]) for name in reference)
    if same_as == "backdoor":
        honest = _trained_reply("none")
        assert not all(torch.equal(reply[name], honest[name]) for name in honest)


@pytest.mark.parametrize(("node_config", "message"), [
    ({}, "'partition-id' is missing"),
    ({"partition-id": 0}, "'num-partitions' is missing"),
    ({"partition-id": "a", "num-partitions": 4}, "must be an integer"),
    ({"partition-id": 1.5, "num-partitions": 4}, "must be an integer"),
    ({"partition-id": 4, "num-partitions": 4}, "0 <= partition-id < num-partitions"),
    ({"partition-id": True, "num-partitions": 4}, "'partition-id' is True"),
])
def test_a_node_without_a_usable_partition_gets_a_config_error_naming_the_key(node_config, message):
    from softmerge.client.app import node_partition
    from softmerge.simulations.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        node_partition(node_config)


def test_a_node_partition_from_the_command_line_is_read_as_integers():
    from softmerge.client.app import node_partition

    assert node_partition({"partition-id": "2", "num-partitions": 5}) == (2, 5)
    assert node_partition({"partition-id": 0, "num-partitions": 1.0}) == (0, 1)


@pytest.mark.usefixtures("task_identity")
def test_a_train_message_without_its_round_is_trained_and_logged(caplog):
    from flwr.app import ArrayRecord, Context, Message, RecordDict

    from softmerge.client.app import train_reply
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.tasks import build_model

    settings = parse_run_config({"local-epochs": 1})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 4},
                      state=RecordDict(), run_config={})
    instruction = Message(RecordDict({"arrays": ArrayRecord(build_model(settings.dataset).state_dict())}),
                          dst_node_id=1, message_type="train")
    with caplog.at_level("WARNING"):
        reply = train_reply(instruction, context, settings)
    assert reply.content["metrics"]["num-examples"] > 0
    assert "without config 'server-round'" in caplog.text


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("server_round", ["abc", 2.7, -5, True, [1, 2]])
def test_a_train_message_with_a_malformed_round_is_refused_by_name(server_round):
    """A fractional round silently shared another round's seed; a negative one failed deep in numpy."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from softmerge.client.app import train_reply
    from softmerge.simulations.config import ConfigError, parse_run_config
    from softmerge.simulations.tasks import build_model

    settings = parse_run_config({"local-epochs": 1, "attack": "backdoor", "malicious-partitions": "0"})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 4},
                      state=RecordDict(), run_config={})
    instruction = Message(RecordDict({"arrays": ArrayRecord(build_model(settings.dataset).state_dict()),
                                      "config": ConfigRecord({"server-round": server_round})}),
                          dst_node_id=1, message_type="train")
    with pytest.raises(ConfigError, match="'server-round' must be an integer >= 0"):
        train_reply(instruction, context, settings)


@pytest.mark.parametrize("attack", ["sign-flip", "gaussian", "scaling", "layer-stealth"])
def test_running_statistics_are_sent_as_trained_and_the_model_stays_finite(attack):
    # A sign-flipped or noised running variance goes negative and the model's outputs NaN;
    # any screen would then reject the reply, so the attack must leave the statistics alone.
    from torch import nn

    from softmerge.aggregation.candidates import running_statistics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(16, 4) * 3 + 1).sum().backward()
        optimizer.step()
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    statistics = running_statistics(model)
    assert set(statistics) == {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}

    sent = poison_state(attack, global_state, trained, scale=20.0, std=5.0,
                        generator=torch.Generator().manual_seed(1), statistics=statistics)
    for name in statistics:
        assert torch.equal(sent[name], trained[name]), name
    # The attack still reaches the parameters (layer-stealth: the last layer's).
    attacked = "4.weight" if attack == "layer-stealth" else "0.weight"
    assert not torch.equal(sent[attacked], trained[attacked])
    if attack == "layer-stealth":
        assert torch.equal(sent["0.weight"], trained["0.weight"])
    model.load_state_dict(sent)
    model.eval()
    assert torch.isfinite(model(torch.randn(8, 4))).all()


def test_layer_stealth_targets_the_last_layer_with_weights_not_a_trailing_buffer_only_norm():
    from torch import nn

    from softmerge.aggregation.candidates import running_statistics
    from softmerge.client.attacks import last_layer_prefix

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3, affine=False))
    state = model.state_dict()
    assert last_layer_prefix(state) == "3"  # its running statistics are its only tensors
    assert last_layer_prefix(state, running_statistics(model)) == "2"
    trained = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}
    sent = poison_state("layer-stealth", state, trained, scale=5.0, statistics=running_statistics(model))
    assert torch.allclose(sent["2.weight"], state["2.weight"] - 5.0, atol=1e-5)
    assert torch.equal(sent["0.weight"], trained["0.weight"])
    assert torch.equal(sent["3.running_var"], trained["3.running_var"])
