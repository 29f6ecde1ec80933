"""Trust carried over rounds: the record's arithmetic, the bound it puts on a start, and the strategy's record."""

import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from softmerge.aggregation import SoftMergeConfig, soft_merge
from softmerge.aggregation.gates import LOG_ALPHA_CLOSED
from softmerge.aggregation.trust import forget_least_recent, relative_openness, trust_bound, trust_of, update_record
from softmerge.server.strategy import SoftMerge

from flower_helpers import StubGrid, make_reply


def test_relative_openness_is_each_client_gate_over_the_most_open_client():
    # Two units; column 2 is the keep candidate and is neither scored nor the reference.
    gates = [[1.0, 0.2, 1.0], [0.6, 0.0, 1.0]]
    assert relative_openness(gates, [0, 1]) == pytest.approx([1.0, 0.125])
    assert relative_openness([[0.0, 0.0, 1.0]], [0, 1]) is None  # every client closed: no evidence
    assert relative_openness(gates, []) is None
    # A nan gate counts as closed, wherever it sits (max() alone answered by its position).
    assert relative_openness([[math.nan, 0.5]], [0, 1]) == relative_openness([[0.5, math.nan]], [1, 0]) == [0.0, 1.0]


def test_update_record_discounts_and_leaves_absent_clients_alone():
    record = {"a": (2.0, 4.0), "b": (1.0, 1.0)}
    updated = update_record(record, ["a", "c"], [0.5, 1.0], memory=0.5)
    assert updated["a"] == pytest.approx((0.5 * 2.0 + 0.5, 0.5 * 4.0 + 1.0))
    assert updated["c"] == (1.0, 1.0)
    assert updated["b"] == (1.0, 1.0)
    assert record["a"] == (2.0, 4.0)  # the input is not modified
    assert update_record(record, ["a"], None, 0.5) == record


def test_the_record_runs_from_least_to_most_recently_gated_and_forgets_the_oldest():
    record = update_record({}, ["a", "b", "c"], [1.0, 1.0, 1.0], memory=0.9)
    record = update_record(record, ["a"], [0.0], memory=0.9)
    assert list(record) == ["b", "c", "a"]
    kept = forget_least_recent(record, 2)
    assert list(kept) == ["c", "a"] and kept["a"] == record["a"]
    assert forget_least_recent(record, 5) == record
    with pytest.raises(ValueError, match="max_records"):
        forget_least_recent(record, 0)


def test_trust_is_the_beta_posterior_mean_and_neutral_for_a_newcomer():
    assert trust_of({}, "new") == 0.5
    assert trust_of({"x": (0.0, 10.0)}, "x") == pytest.approx(1 / 12)
    assert trust_of({"x": (10.0, 10.0)}, "x") == pytest.approx(11 / 12)


def test_trust_bound_is_the_log_odds_below_one_half_and_nothing_above():
    assert trust_bound(0.5, 2.0, 2.0) == 2.0
    assert trust_bound(0.9, 2.0, 2.0) == 2.0
    assert trust_bound(1 / 12, 2.0, 2.0) == pytest.approx(2.0 + 2.0 * math.log(1 / 11))
    assert trust_bound(1 / 12, 2.0, 2.0) < LOG_ALPHA_CLOSED  # refused every round, long enough: starts closed
    assert trust_bound(0.0, 2.0, 0.0) == 2.0  # strength 0 turns it off
    assert math.isfinite(trust_bound(0.0, 2.0, 2.0))


def test_soft_merge_starts_a_distrusted_candidate_at_its_bound(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    config = SoftMergeConfig(steps=0)
    states = locals_[:3]
    _, plain = soft_merge(model, states, digits_task.gate.tensors(), config)
    _, bounded = soft_merge(model, states, digits_task.gate.tensors(), config, trust=[0.5, 0.9, 1 / 12])
    bound = trust_bound(1 / 12, config.init_log_alpha, config.trust_strength)
    assert bounded.log_alpha[0][:2] == pytest.approx(plain.log_alpha[0][:2])
    assert bounded.log_alpha[0][2] == pytest.approx(min(plain.log_alpha[0][2], bound))
    assert bounded.gates[0][2] == 0.0
    assert bounded.trust == pytest.approx([0.5, 0.9, 1 / 12, 0.5])  # the keep candidate has no record
    assert plain.trust == []
    _, off = soft_merge(model, states, digits_task.gate.tensors(), SoftMergeConfig(steps=0, trust_strength=0.0),
                        trust=[0.5, 0.9, 1 / 12])
    assert off.log_alpha[0] == pytest.approx(plain.log_alpha[0])


def test_gate_learning_may_reopen_a_distrusted_candidate_only_up_to_its_own_evidence(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    states = locals_[:4]
    config = SoftMergeConfig(steps=60, tolerance=0.0)
    _, start = soft_merge(model, states, digits_task.gate.tensors(), SoftMergeConfig(steps=0))
    _, learned = soft_merge(model, states, digits_task.gate.tensors(), config, trust=[0.5, 0.5, 0.5, 0.2])
    assert learned.log_alpha[0][3] <= start.log_alpha[0][3] + 1e-6
    # ...and may reopen it past the trust bound it started under: the bound is a start, not a ceiling.
    assert learned.log_alpha[0][3] > trust_bound(0.2, config.init_log_alpha, config.trust_strength)


def test_identical_models_take_the_trust_of_their_most_trusted_sender(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    copy = {k: v.clone() for k, v in locals_[0].items()}
    _, report = soft_merge(model, [locals_[0], copy, locals_[1]], digits_task.gate.tensors(),
                           SoftMergeConfig(steps=0), trust=[0.9, 0.01, 0.5])
    assert report.trust[:2] == [0.9, 0.9]
    assert report.gates[0][0] == report.gates[0][1] > 0


@pytest.mark.parametrize("trust", [[0.5, 0.5], [0.5, 0.5, 1.5], [0.5, math.nan, 0.5]])
def test_soft_merge_rejects_malformed_trust(honest_candidates, digits_task, trust):
    model, locals_ = honest_candidates
    with pytest.raises(ValueError, match="trust"):
        soft_merge(model, locals_[:3], digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=trust)


def test_trust_strength_must_be_a_finite_non_negative_number():
    for value in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="trust_strength"):
            SoftMergeConfig(trust_strength=value)


@pytest.mark.usefixtures("task_identity")
def test_strategy_keeps_a_record_per_node_and_it_survives_a_checkpoint(honest_candidates, digits_task, caplog):
    model, locals_ = honest_candidates
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=True, trust_memory=0.5)
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid([11, 12, 13])))
    garbage = {k: torch.randn_like(v) * 50 if v.dtype.is_floating_point else v for k, v in locals_[2].items()}
    # Node 13 claims client 0's label: the record follows the node ID, not the label.
    replies = [make_reply(11, locals_[0], partition=0), make_reply(12, locals_[1], partition=1),
               make_reply(13, garbage, partition=0)]
    for server_round in (1, 2, 3):
        strategy.aggregate_train(server_round, replies)
    record = strategy.trust_record
    assert set(record) == {"11", "12", "13"}
    assert record["13"][0] == 0.0 and record["13"][1] == pytest.approx(1 + 0.5 + 0.25)
    assert trust_of(record, "13") < 0.5 < trust_of(record, "11")
    column = strategy.reports[3].candidates.index("client-0@node-13")
    assert strategy.reports[3].trust[column] == pytest.approx(trust_of({"13": (0.0, 1.5)}, "13"))

    restored = SoftMerge(model, digits_task.gate.tensors(), trust=True)
    restored.load_trust_state(strategy.trust_state())
    assert restored.trust_record == record

    with caplog.at_level(logging.WARNING):
        for malformed in ({"13": ["x", 1]}, {"13": [5.0, 1.0]}, ["not", "a", "record"], {"13": [math.nan, 1.0]}):
            restored.load_trust_state(malformed)
            assert restored.trust_record == record
    assert caplog.text.count("trust record is malformed") == 4


@pytest.mark.usefixtures("task_identity")
def test_a_restored_record_follows_its_client_to_new_node_ids_by_label(honest_candidates, digits_task, caplog):
    model, locals_ = honest_candidates
    saved = {"11": [0.0, 1.9, "client-0"], "12": [1.9, 1.9, "client-1"]}

    def first_round(state, node_ids, partitions=(0, 1), follow_labels=True):
        strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=True,
                             follow_labels=follow_labels)
        strategy.load_trust_state(state)
        list(strategy.configure_train(4, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid(node_ids)))
        strategy.aggregate_train(4, [make_reply(node, locals_[k], partition=partition)
                                     for k, (node, partition) in enumerate(zip(node_ids, partitions))])
        return strategy

    distrusted = trust_of({"11": (0.0, 1.9)}, "11")
    # A deployment: the nodes keep their IDs, and their records.
    returning = first_round(saved, [11, 12])
    assert returning.reports[4].trust[0] == pytest.approx(distrusted)
    assert returning.trust_record["11"][1] == pytest.approx(1.9 * 0.9 + 1)
    assert returning.trust_state()["11"][2] == "client-0"

    # A resumed simulation: the same clients under new node IDs take their labels' records.
    with caplog.at_level(logging.WARNING):
        resumed = first_round(saved, [21, 22])
    assert "2 of the 2 replying nodes took their client label's record" in caplog.text
    assert resumed.reports[4].trust[0] == pytest.approx(distrusted)
    assert set(resumed.trust_record) == {"21", "22"}
    assert resumed.trust_record["21"] == returning.trust_record["11"]

    # Two new nodes claiming one label: the record goes to neither.
    contested = first_round(saved, [21, 22], partitions=(0, 0))
    assert contested.reports[4].trust == [pytest.approx(0.5)] * 3  # both clients neutral, and the keep candidate

    # Where labels cannot be believed (a deployment, the default), a node that claims the
    # trusted client-1's label does not take its record, and with it the mirror-test pass.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        claimed = first_round(saved, [21, 22], partitions=(1, 0), follow_labels=False)
    assert "the records stay with their node IDs and the replying nodes start neutral" in caplog.text
    assert claimed.reports[4].trust == [pytest.approx(0.5)] * 3
    assert claimed.trust_state()["12"] == saved["12"] and claimed.trust_state()["11"] == saved["11"]
    assert SoftMerge(model, digits_task.gate.tensors()).follow_labels is False

    # A checkpoint written before records carried labels: new IDs start over.
    unlabelled = first_round({node: entry[:2] for node, entry in saved.items()}, [21, 22])
    assert unlabelled.reports[4].trust == [pytest.approx(0.5)] * 3
    assert set(unlabelled.trust_record) == {"21", "22"}


@pytest.mark.usefixtures("task_identity")
def test_a_client_absent_from_the_first_resumed_round_keeps_its_record_for_later(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    saved = {"11": [0.0, 1.9, "client-0"], "12": [1.9, 1.9, "client-1"], "13": [1.9, 1.9, "client-2"]}
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=True, follow_labels=True)
    strategy.load_trust_state(saved)

    def play(server_round, node_ids, partitions):
        list(strategy.configure_train(server_round, ArrayRecord(model.state_dict()), ConfigRecord(),
                                      StubGrid(node_ids)))
        strategy.aggregate_train(server_round, [make_reply(node, locals_[k % len(locals_)], partition=partition)
                                                for k, (node, partition) in enumerate(zip(node_ids, partitions))])

    # Resumed as a simulation (new node IDs); client-0, the distrusted one, is not sampled first.
    play(4, [22, 23], (1, 2))
    assert set(strategy.trust_record) == {"11", "22", "23"}
    assert strategy.trust_state()["11"] == [0.0, 1.9, "client-0"]  # a checkpoint now keeps it too
    play(5, [21, 22], (0, 1))
    report = strategy.reports[5]
    assert report.trust[report.candidates.index("client-0")] == pytest.approx(trust_of({"c": (0.0, 1.9)}, "c"))
    assert set(strategy.trust_record) == {"21", "22", "23"}


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_keeps_only_the_most_recently_gated_records(honest_candidates, digits_task, monkeypatch,
                                                                  caplog):
    # Nodes that leave for good (churn) must not grow the record, or the checkpoint, without end.
    model, locals_ = honest_candidates
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=True, trust_max_records=3)

    def play(server_round, node_ids, partitions=None):
        list(strategy.configure_train(server_round, ArrayRecord(model.state_dict()), ConfigRecord(),
                                      StubGrid(node_ids)))
        strategy.aggregate_train(server_round, [make_reply(node, locals_[k], partition=partition)
                                                for k, (node, partition) in
                                                enumerate(zip(node_ids, partitions or node_ids))])

    play(1, [11, 12, 13])
    play(2, [12, 14])
    assert list(strategy.trust_record) == ["13", "12", "14"]
    assert set(strategy.trust_labels) == {"13", "12", "14"}
    play(3, [15, 13])
    assert list(strategy.trust_record) == ["14", "13", "15"]
    assert set(strategy.trust_labels) == set(strategy.trust_record)
    # 13's record survived its absence in round 2: one more round of discounting, no more.
    assert strategy.trust_record["13"][1] == pytest.approx(0.9 + 1)

    # A checkpoint keeps the order; a restore under a smaller cap keeps the most recent.
    smaller = SoftMerge(model, digits_task.gate.tensors(), trust=True, trust_max_records=2)
    with caplog.at_level(logging.WARNING):
        smaller.load_trust_state(strategy.trust_state())
    assert list(smaller.trust_record) == ["13", "15"] and set(smaller.trust_labels) == {"13", "15"}
    assert "holds 3 clients and softmerge-trust-max-records is 2; the 1 least recently gated" in caplog.text
    # A resumed simulation's restored records that wait for their client are forgotten like
    # any other; the client that comes back later starts neutral.
    resumed = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=True,
                        trust_max_records=3, follow_labels=True)
    resumed.load_trust_state({"1": [0.0, 1.9, "client-0"], "2": [0.0, 1.9, "client-1"],
                              "3": [0.0, 1.9, "client-2"]})
    strategy = resumed
    play(4, [20, 23, 24], partitions=[0, 3, 4])  # client-0 under a new node ID, and two newcomers
    assert list(resumed.trust_record) == ["20", "23", "24"]
    assert resumed.trust_record["20"][1] == pytest.approx(1.9 * 0.9 + 1)  # client-0's record, moved
    play(5, [21, 22], partitions=[1, 2])
    assert resumed.reports[5].trust == [pytest.approx(0.5)] * 3
    # A round that records nothing (every client gate closed) keeps no labels either, which
    # would otherwise pile up under churn beside a capped record.
    import softmerge.server.strategy as strategy_module

    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=True)
    monkeypatch.setattr(strategy_module, "relative_openness", lambda gates, columns: None)
    play(6, [31, 32])
    assert strategy.trust_record == {} and strategy.trust_labels == {}
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="trust_max_records"):
            SoftMerge(model, digits_task.gate.tensors(), trust_max_records=bad)


@pytest.mark.usefixtures("task_identity")
def test_strategy_with_trust_off_keeps_no_record(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    assert SoftMerge(model, digits_task.gate.tensors()).trust  # on unless asked otherwise
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=False)
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid([1, 2])))
    strategy.aggregate_train(1, [make_reply(1, locals_[0], partition=0), make_reply(2, locals_[1], partition=1)])
    assert strategy.trust_record == {} and strategy.reports[1].trust == []
    with pytest.raises(ValueError, match="trust_memory"):
        SoftMerge(model, digits_task.gate.tensors(), trust=True, trust_memory=1.5)


@pytest.mark.usefixtures("task_identity")
def test_a_cap_below_one_rounds_clients_is_said_not_done_quietly(honest_candidates, digits_task, caplog):
    # A cap smaller than a round's clients forgets some of them every round, so the record
    # never bounds them; the operator must hear of it.
    model, locals_ = honest_candidates
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=True, trust_max_records=2)

    def play(server_round, node_ids):
        list(strategy.configure_train(server_round, ArrayRecord(model.state_dict()), ConfigRecord(),
                                      StubGrid(node_ids)))
        strategy.aggregate_train(server_round, [make_reply(node, locals_[k], partition=node)
                                                for k, node in enumerate(node_ids)])

    with caplog.at_level(logging.WARNING):
        play(1, [11, 12])
    assert "trust record keeps at most" not in caplog.text
    with caplog.at_level(logging.WARNING):
        play(2, [11, 12, 13])
    assert "round 2: 3 clients were gated but the trust record keeps at most 2" in caplog.text
    assert len(strategy.trust_record) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        play(3, [11, 12, 13])
    assert "trust record keeps at most" not in caplog.text  # once per run, not once per round


@pytest.mark.usefixtures("task_identity")
def test_the_cap_warning_waits_for_a_round_that_records(honest_candidates, digits_task, caplog, monkeypatch):
    # A round whose gates are all closed records nobody, so nobody is forgotten either.
    import softmerge.server.strategy as strategy_module

    model, locals_ = honest_candidates
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=True, trust_max_records=2)
    monkeypatch.setattr(strategy_module, "relative_openness", lambda gates, columns: None)
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid([11, 12, 13])))
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, [make_reply(node, locals_[k], partition=node)
                                     for k, node in enumerate([11, 12, 13])])
    assert "trust record keeps at most" not in caplog.text
    assert strategy.trust_record == {}


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_tells_the_merge_which_clients_are_newcomers(honest_candidates, digits_task, monkeypatch):
    # A node with no record is a newcomer to the mirror test's sparing (see soft_merge's
    # ``recorded``), however its label reads: a new node ID has no record.
    import softmerge.server.strategy as strategy_module

    model, locals_ = honest_candidates
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=True)
    seen = []

    def recording_merge(*args, **kwargs):
        seen.append(kwargs["recorded"])
        return soft_merge(*args, **kwargs)
    monkeypatch.setattr(strategy_module, "soft_merge", recording_merge)

    def play(server_round, node_ids):
        list(strategy.configure_train(server_round, ArrayRecord(model.state_dict()), ConfigRecord(),
                                      StubGrid(node_ids)))
        strategy.aggregate_train(server_round, [make_reply(node, locals_[k], partition=k)
                                                for k, node in enumerate(node_ids)])

    play(1, [11, 12])
    play(2, [11, 12, 13])  # 13: client-2 under a node ID never gated
    assert seen == [[False, False], [True, True, False]]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("copies_earn_trust", [True, False])
def test_a_node_that_resends_an_honest_update_earns_its_record_only_if_copies_earn_trust(
        honest_candidates, digits_task, copies_earn_trust):
    """The group's shared gate says the reply is good, not that each sender produced it."""
    model, locals_ = honest_candidates

    def strategy_playing(replies, rounds):
        strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=0), trust=True,
                             trust_copies=copies_earn_trust)
        for server_round in range(1, rounds + 1):
            list(strategy.configure_train(server_round, ArrayRecord(model.state_dict()), ConfigRecord(),
                                          StubGrid([11, 12, 13, 20])))
            strategy.aggregate_train(server_round, replies)
        return strategy

    honest = [make_reply(11 + k, locals_[k], partition=k) for k in range(3)]
    # Node 20 copies, bit for bit and every round, the honest update the gates open most.
    gates = strategy_playing(honest, 1).reports[1].gates[0]
    copied = max(range(3), key=lambda k: gates[k])
    strategy = strategy_playing([*honest, make_reply(20, locals_[copied], partition=9)], 3)
    assert [f"client-{copied}", "client-9"] in [sorted(group) for group in strategy.reports[3].duplicates]
    record, source = strategy.trust_record, str(11 + copied)
    if copies_earn_trust:
        assert record["20"] == record[source] and trust_of(record, "20") > 0.5
    else:
        # At most a newcomer's trust from what the group earned, for the copier and the copied alike.
        assert trust_of(record, "20") == trust_of(record, source) == 0.5


@pytest.mark.usefixtures("task_identity")
def test_newcomers_are_tested_once_the_strategy_holds_any_record_even_in_a_round_of_newcomers(
        honest_candidates, digits_task):
    """A round of new node IDs alone (a SuperLink that lost its database) must not spare them all."""
    model, locals_ = honest_candidates
    global_state = model.state_dict()
    flipped = {k: global_state[k] - 0.1 * (v - global_state[k]) if v.dtype.is_floating_point else v
               for k, v in locals_[5].items()}

    def flipped_weight(recorded_node_replies):
        strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(mirror_trusted=0.5), trust=True)

        def play(server_round, senders):
            list(strategy.configure_train(server_round, ArrayRecord(global_state), ConfigRecord(),
                                          StubGrid([node for node, _, _ in senders])))
            strategy.aggregate_train(server_round, [make_reply(node, state, partition=p) for node, state, p in senders])
            return strategy.reports[server_round]

        for server_round in (1, 2, 3):
            play(server_round, [(11 + k, locals_[k], k) for k in range(5)])
        senders = [(21, locals_[6], 6), (22, locals_[7], 7), (30, flipped, 8)]
        report = play(4, senders + ([(11, locals_[0], 0)] if recorded_node_replies else []))
        column = report.candidates.index("client-8")
        return sum(row[column] for row in report.weights)

    # Node 30 is a newcomer either way: with records held, the mirror test shuts its flipped update.
    assert flipped_weight(recorded_node_replies=True) == 0.0
    assert flipped_weight(recorded_node_replies=False) == 0.0
