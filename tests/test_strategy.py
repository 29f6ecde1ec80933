"""SoftMerge as a Flower strategy, fed hand-built reply messages."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from softmerge.aggregation import SoftMergeConfig
from softmerge.server.strategy import SoftMerge

from flower_helpers import StubGrid, make_reply

pytestmark = pytest.mark.usefixtures("task_identity")


def _strategy(model, digits_task, reports):
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=30),
                         on_report=lambda r, report: reports.append((r, report)))
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid(list(range(1, 9)))))
    return strategy


def test_aggregate_train_merges_valid_replies_and_excludes_the_rest(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    reports = []
    strategy = _strategy(model, digits_task, reports)
    nan_state = {k: torch.full_like(v, math.nan) for k, v in locals_[5].items()}
    replies = [make_reply(i + 1, locals_[i], partition=i) for i in range(5)]
    replies += [make_reply(6, error="client crashed"), make_reply(7, nan_state, partition=6),
                make_reply(8, locals_[7], extra_arrays=True)]

    arrays, metrics = strategy.aggregate_train(1, replies)

    merged = arrays.to_torch_state_dict()
    assert set(merged) == set(model.state_dict())
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert metrics["softmerge-excluded"] == 3 and metrics["softmerge-candidates"] == 6
    assert "partition-id" not in metrics and metrics["train-loss"] == pytest.approx(0.5)
    (server_round, report), = reports
    assert server_round == 1 and strategy.reports[1] is report
    assert report.candidates == [f"client-{i}" for i in range(5)] + ["keep"]
    reasons = " ".join(e.reason for e in report.excluded)
    assert "client crashed" in reasons and "non-finite" in reasons and "one ArrayRecord" in reasons


def test_a_round_with_no_valid_reply_keeps_the_global_model(honest_candidates, digits_task):
    model, _ = honest_candidates
    strategy = _strategy(model, digits_task, [])
    arrays, metrics = strategy.aggregate_train(1, [make_reply(1, error="timeout"), make_reply(2, error="oom")])
    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert metrics["softmerge-excluded"] == 2 and metrics["softmerge-keep-weight"] == 1.0


def test_wrongly_shaped_reply_is_excluded(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    strategy = _strategy(model, digits_task, [])
    wrong = dict(locals_[1])
    wrong["fc1.weight"] = torch.zeros(3, 3)
    wrong_dtype = {k: v.double() for k, v in locals_[2].items()}
    arrays, metrics = strategy.aggregate_train(
        2, [make_reply(1, locals_[0], partition=0), make_reply(2, wrong, partition=1),
            make_reply(3, wrong_dtype, partition=2)])
    assert metrics["softmerge-excluded"] == 2
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
    assert isinstance(next(iter(arrays.values())), Array)


def test_summary_names_the_warm_start_rules_in_force(honest_candidates, digits_task, caplog):
    model, _ = honest_candidates
    config = SoftMergeConfig(mirror_test=False, mirror_confidence=0.5, merge_duplicates=False)
    strategy = SoftMerge(model, digits_task.gate.tensors(), merge_config=config)
    with caplog.at_level("INFO", logger="flwr"):
        strategy.summary()
    line = next(record.getMessage() for record in caplog.records if "mirror test" in record.getMessage())
    assert "ceiling: True" in line and "mirror test: False (z = 0.5)" in line
    assert "identical replies share a gate: False" in line


@pytest.mark.parametrize("num_nodes", [None, 5])
def test_multikrum_averages_n_minus_f_of_each_rounds_replies_whatever_the_count_known_at_start(num_nodes):
    # Blanchard et al.'s m = n - f, with n the replies of the round: known or not when the
    # strategy was built (a simulation's nodes may not have registered yet), and fewer in
    # a round with a dropout.
    from softmerge.server.strategies import build_strategy
    from softmerge.simulations.config import parse_run_config

    model = torch.nn.Linear(1, 1, bias=False)
    settings = parse_run_config({"strategy": "multikrum", "assumed-malicious": 1})
    strategy = build_strategy(settings, model, (torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)),
                              num_nodes=num_nodes)

    def merged(values):
        list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(),
                                      StubGrid(range(1, len(values) + 1))))
        replies = [make_reply(i + 1, {"weight": torch.tensor([[value]])}) for i, value in enumerate(values)]
        arrays, _ = strategy.aggregate_train(1, replies)
        return float(arrays.to_torch_state_dict()["weight"])

    # Five replies, f = 1: the four best Krum scores are 0, 1, 2 and 4 (m = 2 would give 0.5 or 1.5).
    assert merged([0.0, 1.0, 2.0, 4.0, 100.0]) == pytest.approx(1.75)
    # Four replies: m = 3, not the 4 a count fixed at start would keep (the outlier among them).
    assert merged([0.0, 1.0, 2.0, 100.0]) == pytest.approx(1.0)


def test_every_configured_strategy_builds_and_the_update_rules_know_the_running_statistics():
    from softmerge.server.baselines import _UpdateAggregation
    from softmerge.server.strategies import build_strategy
    from softmerge.simulations.config import STRATEGIES, parse_run_config

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    gate = (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    for name in STRATEGIES:
        settings = parse_run_config({"strategy": name, "assumed-malicious": 0})
        strategy = build_strategy(settings, model, gate, num_nodes=10)
        if isinstance(strategy, _UpdateAggregation):
            # BatchNorm's mean and variance are merged as the clients' median, not by the rule.
            assert strategy.statistics == {"1.running_mean", "1.running_var"}, name
            assert "1.running_var" not in strategy.update_names(model.state_dict())


@pytest.mark.parametrize("edit, message", [
    (lambda x, y: (x.double(), y), "inputs are torch.float64 but the model's parameters are torch.float32"),
    (lambda x, y: (x, y.float()), "labels must be class indices"),
    (lambda x, y: (x, y[:-1]), "one label per input"),
    (lambda x, y: (x, y + 10), r"labels must lie in \[0, 10\)"),
    (lambda x, y: (x[:, :-1], y), "the model cannot run on the gate split's inputs"),
    (lambda x, y: x, "must be a pair of tensors"),
    (lambda x, y: (x[:0], y[:0]), "split is empty"),
])
def test_a_gate_split_the_model_cannot_score_is_refused_when_the_strategy_is_built(honest_candidates, digits_task,
                                                                                   edit, message):
    """Found in round 1's merge, such a split ended the run after every client had trained."""
    model, _ = honest_candidates
    with pytest.raises(ValueError, match=message):
        SoftMerge(model, edit(*digits_task.gate.tensors()))


def test_integer_labels_of_any_width_are_read_as_class_indices(honest_candidates, digits_task):
    model, locals_ = honest_candidates
    inputs, labels = digits_task.gate.tensors()
    strategy = SoftMerge(model, (inputs, labels.to(torch.int32)), SoftMergeConfig(steps=10))
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid([1, 2, 3])))
    arrays, metrics = strategy.aggregate_train(1, [make_reply(i + 1, locals_[i], partition=i) for i in range(3)])
    assert metrics["softmerge-candidates"] == 4 and metrics["softmerge-merge-failed"] == 0
    assert strategy.validation[1].dtype == torch.int64


def _round_with_merge(honest_candidates, digits_task, monkeypatch, caplog, merge):
    """One round of four honest replies with ``merge`` in place of soft_merge; asserts the global model stays."""
    import softmerge.server.strategy as strategy_module

    model, locals_ = honest_candidates
    strategy = _strategy(model, digits_task, [])
    monkeypatch.setattr(strategy_module, "soft_merge", merge)
    with caplog.at_level("WARNING"):
        arrays, metrics = strategy.aggregate_train(1, [make_reply(i + 1, locals_[i], partition=i) for i in range(4)])
    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    return strategy, metrics


def test_a_merge_that_overflows_keeps_the_global_model_and_uses_no_reply(honest_candidates, digits_task,
                                                                          monkeypatch, caplog):
    from softmerge.server.strategy import soft_merge

    def overflowing(*args, **kwargs):
        merged, report = soft_merge(*args, **kwargs)
        return {k: torch.full_like(v, math.inf) if v.is_floating_point() else v for k, v in merged.items()}, report

    strategy, metrics = _round_with_merge(honest_candidates, digits_task, monkeypatch, caplog, overflowing)
    # A run of such rounds must end failed, not finished untrained (server.app counts replies-used).
    assert metrics["replies-used"] == 0 and metrics["softmerge-merge-failed"] == 0
    assert "the merge overflowed; keeping the global model" in caplog.text
    # The round's report describes the model that went out: all weight on the global model.
    report = strategy.reports[1]
    assert report.weights == [[0.0, 0.0, 0.0, 0.0, 1.0]] and report.candidates[-1] == "keep"
    assert report.loss_after == report.loss_before
    # The discarded merge's gates are not evidence about the clients.
    assert strategy.trust_record == {}


def test_a_round_that_gives_every_reply_weight_0_used_no_reply(honest_candidates, digits_task):
    """Finite but useless models (a broken client build) pass the screen and end at weight 0."""
    model, locals_ = honest_candidates
    strategy = _strategy(model, digits_task, [])
    generator = torch.Generator().manual_seed(0)
    useless = [{k: torch.randn(v.shape, generator=generator) * 3 for k, v in model.state_dict().items()}
               for _ in range(3)]
    arrays, metrics = strategy.aggregate_train(1, [make_reply(i + 1, useless[i], partition=i) for i in range(3)])
    merged = arrays.to_torch_state_dict()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert metrics["replies-excluded"] == 0 and metrics["replies-used"] == 0
    # A client that resends the global model unchanged shares its weight, but trained nothing.
    echo = {k: v.clone() for k, v in model.state_dict().items()}
    arrays, metrics = strategy.aggregate_train(3, [make_reply(i + 1, useless[i], partition=i) for i in range(3)]
                                               + [make_reply(4, echo, partition=3)])
    assert any("keep" in group and "client-3" in group for group in strategy.reports[3].duplicates)
    assert metrics["replies-used"] == 0
    # Among honest replies, exactly the replies holding weight count: the honest ones here.
    replies = [make_reply(i + 1, locals_[i], partition=i) for i in range(4)]
    replies += [make_reply(i + 5, useless[i], partition=i + 4) for i in range(3)]
    arrays, metrics = strategy.aggregate_train(2, replies)
    report = strategy.reports[2]
    holding = {label for k, label in enumerate(report.candidates)
               if label != "keep" and any(row[k] > 0 for row in report.weights)}
    assert metrics["replies-used"] == len(holding) >= 1
    assert holding <= {"client-0", "client-1", "client-2", "client-3"}


def test_a_merge_seed_at_the_top_of_its_range_still_merges(honest_candidates, digits_task):
    """The config accepts any seed below 2**63, and each round adds its number to it."""
    model, locals_ = honest_candidates
    strategy = SoftMerge(model, digits_task.gate.tensors(), SoftMergeConfig(steps=4, seed=2**63 - 1))
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid([1, 2, 3])))
    arrays, metrics = strategy.aggregate_train(1, [make_reply(i + 1, locals_[i], partition=i) for i in range(3)])
    assert metrics["softmerge-merge-failed"] == 0 and metrics["replies-used"] >= 1


def test_a_merge_that_raises_keeps_the_global_model_and_records_no_trust(honest_candidates, digits_task, monkeypatch,
                                                                           caplog):
    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    strategy, metrics = _round_with_merge(honest_candidates, digits_task, monkeypatch, caplog, failing)
    # No reply went into a model: a run of such rounds must end failed, not finished untrained.
    assert metrics["softmerge-merge-failed"] == 1 and metrics["replies-used"] == 0
    assert metrics["train-loss"] == pytest.approx(0.5)
    assert strategy.trust_record == {} and 1 not in strategy.reports
    assert "the merge failed (RuntimeError: out of memory); keeping the global model" in caplog.text


def test_a_model_with_tied_weights_merges():
    """Tied names arrive as two arrays; scoring a candidate must not ask torch to tie them again."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(4, 4)
            self.hidden = torch.nn.Linear(4, 4)
            self.hidden.weight = self.embed.weight
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(self.hidden(torch.relu(self.embed(x)))))

    torch.manual_seed(0)
    model = Tied()
    gate = (torch.randn(24, 4), torch.arange(24) % 3)
    strategy = SoftMerge(model, gate, SoftMergeConfig(steps=4, check_every=2))
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    list(strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), StubGrid([1, 2, 3])))
    replies = []
    for node in (1, 2, 3):
        noise = 0.01 * torch.randn(4, 4)
        state = {k: v + 0.01 * node for k, v in global_state.items()}
        state["embed.weight"] = global_state["embed.weight"] + noise
        state["hidden.weight"] = state["embed.weight"].clone()
        replies.append(make_reply(node, state, partition=node))
    arrays, metrics = strategy.aggregate_train(1, replies)
    merged = arrays.to_torch_state_dict()
    assert metrics["softmerge-candidates"] == 4 and metrics["softmerge-excluded"] == 0
    assert torch.equal(merged["embed.weight"], merged["hidden.weight"])
