"""Every run-config error path names the key and what it allows."""

import math
import re

import pytest

from softmerge.aggregation import SoftMergeConfig
from softmerge.simulations.config import ConfigError, RunSettings, parse_run_config, to_run_config


def test_defaults_parse_and_round_trip():
    settings = parse_run_config({})
    assert settings == RunSettings()
    assert parse_run_config(to_run_config(settings)) == settings


def test_pyproject_app_config_is_valid():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    # The Flower app config and the code's defaults are one and the same.
    assert parse_run_config(app_config) == RunSettings()
    # Every setting is listed: `flwr run --run-config` refuses a key the app config lacks.
    assert set(app_config) == set(to_run_config(RunSettings()))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"strategy": "fedprox"}, "'strategy' must be one of softmerge"),
        ({"attack": "teleport"}, "'attack' must be one of none"),
        ({"dataset": "cifar"}, "'dataset' must be one of digits, fashion-mnist"),
        ({"partitioning": "shards"}, "'partitioning' must be one of iid, dirichlet"),
        ({"num-server-rounds": 0}, "'num-server-rounds' must be >= 1"),
        ({"num-server-rounds": 2.5}, "'num-server-rounds' must be an integer"),
        ({"num-server-rounds": "ten"}, "'num-server-rounds' must be an integer"),
        ({"learning-rate": -0.1}, "'learning-rate' must be in (0, 10]"),
        ({"learning-rate": float("nan")}, "'learning-rate' must be a finite number"),
        ({"dirichlet-alpha": 0.0}, "'dirichlet-alpha' must be in (0, inf]"),
        ({"trim-beta": 0.5}, "'trim-beta' must be in (0, 0.5)"),
        ({"fraction-train": 0.0}, "'fraction-train' must be in (0, 1]"),
        ({"fraction-evaluate": 1.5}, "'fraction-evaluate' must be in [0, 1]"),
        ({"softmerge-mode": "mean"}, "'softmerge-mode' must be one of weight, select, sum"),
        ({"softmerge-units": ""}, "'softmerge-units' must be one of model, layer, tensor"),
        # A typo would otherwise leave its tensors to the catch-all unit without a word.
        ({"softmerge-units": "fc1.*, fc_2.*"}, "'softmerge-units': merge-unit pattern 'fc_2.*' matches no tensor"),
        ({"softmerge-units": "fc*, fc2.*"}, "'softmerge-units': merge-unit pattern 'fc2.*' matches no tensor"),
        ({"softmerge-steps": -1}, "'softmerge-steps' must be >= 0"),
        ({"softmerge-keep": "maybe"}, "'softmerge-keep' must be true or false"),
        ({"softmerge-tolerance": -0.1}, "'softmerge-tolerance' must be >= 0"),
        ({"softmerge-tolerance": float("inf")}, "'softmerge-tolerance' must be a finite number"),
        ({"min-nodes": 0}, "'min-nodes' must be >= 1"),
        ({"softmerge-threads": -1}, "'softmerge-threads' must be in [0, 1024]"),
        # Before, this passed and every merge of the run failed in torch.set_num_threads.
        ({"softmerge-threads": 2**31}, "'softmerge-threads' must be in [0, 1024]"),
        ({"softmerge-max-candidates": 2.5}, "'softmerge-max-candidates' must be an integer"),
        ({"softmerge-warm-temperature": 0}, "'softmerge-warm-temperature' must be in (0, 100]"),
        ({"softmerge-ceiling": "sometimes"}, "'softmerge-ceiling' must be true or false"),
        ({"softmerge-mirror-test": 1}, "'softmerge-mirror-test' must be true or false"),
        ({"softmerge-mirror-temperature": 0}, "'softmerge-mirror-temperature' must be in (0, 100]"),
        ({"fltrust-match-client-steps": 2}, "'fltrust-match-client-steps' must be true or false"),
        ({"softmerge-mirror-confidence": -1}, "'softmerge-mirror-confidence' must be >= 0"),
        ({"softmerge-merge-duplicates": "often"}, "'softmerge-merge-duplicates' must be true or false"),
        ({"softmerge-trust": "yes"}, "'softmerge-trust' must be true or false"),
        ({"softmerge-trust-strength": -1}, "'softmerge-trust-strength' must be >= 0"),
        ({"softmerge-trust-strength": math.inf}, "'softmerge-trust-strength' must be a finite number"),
        ({"softmerge-trust-memory": 1.5}, "'softmerge-trust-memory' must be in [0, 1]"),
        ({"softmerge-trust-max-records": 0}, "'softmerge-trust-max-records' must be >= 1"),
        ({"softmerge-trust-max-records": 2.5}, "'softmerge-trust-max-records' must be an integer"),
        ({"softmerge-harm-margin": -0.1}, "'softmerge-harm-margin' must be >= 0"),
        ({"softmerge-mirror-specialists": -1}, "'softmerge-mirror-specialists' must be >= 0"),
        ({"softmerge-mirror-flipped": -1}, "'softmerge-mirror-flipped' must be >= 0"),
        ({"softmerge-mirror-trusted": 1.5}, "'softmerge-mirror-trusted' must be in [0, 1]"),
        ({"softmerge-harm-margin": math.inf}, "'softmerge-harm-margin' must be a finite number"),
        ({"softmerge-example-weights": "maybe"}, "'softmerge-example-weights' must be true or false"),
        ({"softmerge-beat-constant": "maybe"}, "'softmerge-beat-constant' must be true or false"),
        ({"softmerge-uninformed-merge": "mean"}, "'softmerge-uninformed-merge' must be one of"),
        ({"softmerge-warm-step": "half"}, "'softmerge-warm-step' must be one of"),
        ({"softmerge-warm-bend": -1}, "'softmerge-warm-bend' must be >= 0"),
        ({"softmerge-warm-bend": math.inf}, "'softmerge-warm-bend' must be a finite number"),
        ({"softmerge-warm-bend-quantile": 1.5}, "'softmerge-warm-bend-quantile' must be in [0, 1]"),
        ({"softmerge-merge-step-share": "half"}, "'softmerge-merge-step-share' must be one of"),
        ({"softmerge-example-weights": True, "softmerge-mode": "select"},
         "'softmerge-example-weights' needs softmerge-mode = 'weight'"),
        ({"attack-claimed-examples": -1}, "'attack-claimed-examples' must be in [0, 1000000000]"),
        ({"attack-claimed-examples": 2.5}, "'attack-claimed-examples' must be an integer"),
        ({"malicious-partitions": "1,two"}, "malicious-partitions must be comma-separated partition ids"),
        ({"malicious-partitions": "-1"}, "malicious-partitions must hold ids >= 0"),
        ({"extreme-values": "big"}, "extreme-values must be numbers, 'inf' or 'nan'"),
        ({"extreme-values": ""}, "extreme-values must list at least one factor"),
        ({"dataset": "fashion-mnist", "dataset-path": "/no/such/dir"}, "'dataset-path' must be an existing directory"),
        ({"num-rounds": 3}, "unknown run-config key(s) ['num-rounds']"),
        # A larger seed passed the check, then overflowed every client's torch seed: no client ever trained.
        ({"seed": 10**14}, "'seed' must be in [0, 4294967295]"),
        ({"seed": -1}, "'seed' must be in [0, 4294967295]"),
    ],
)
def test_bad_values_are_named(config, message):
    with pytest.raises(ConfigError) as caught:
        parse_run_config(config)
    assert message in str(caught.value)


def test_softmerge_keys_reach_the_merge_config():
    from softmerge.server.strategies import merge_config_from

    settings = parse_run_config({"softmerge-merge-duplicates": "false", "softmerge-mirror-test": False,
                                 "softmerge-ceiling": "false", "softmerge-mirror-confidence": 0.5,
                                 "softmerge-example-weights": "true", "softmerge-mirror-specialists": 3,
                                 "softmerge-mirror-trusted": 0.6, "softmerge-mirror-flipped": 2.5,
                                 "softmerge-beat-constant": "false", "softmerge-uninformed-merge": "direction",
                                 "softmerge-warm-step": "auto", "softmerge-warm-bend": 3,
                                 "softmerge-warm-bend-quantile": 0.5, "softmerge-merge-step-share": "open",
                                 "learning-rate": 0.05, "batch-size": 32,
                                 "local-epochs": 1})
    config = merge_config_from(settings)
    assert config.uninformed_merge == "direction" and config.warm_start_step == "auto"
    assert config.warm_start_bend == 3.0 and config.warm_start_bend_quantile == 0.5
    assert config.merge_step_share == "open"
    # The server trains for the direction merge the way the clients train.
    assert (config.server_lr, config.server_batch_size, config.server_epochs) == (0.05, 32, 1)
    assert config.merge_duplicates is False and config.mirror_test is False and config.example_weights is True
    assert config.beat_constant is False and merge_config_from(parse_run_config({})).beat_constant is True
    assert config.warm_start_ceiling is False and config.mirror_confidence == 0.5
    assert config.mirror_specialist_ratio == 3.0 and config.mirror_trusted == 0.6
    assert config.mirror_flipped_ratio == 2.5
    # The run config's defaults are the merge's own.
    assert merge_config_from(RunSettings()) == SoftMergeConfig()


def test_jittered_colluding_attacks_are_valid_attack_names():
    assert parse_run_config({"attack": "min-sum-jitter"}).attack == "min-sum-jitter"
    assert parse_run_config({"attack": "ipm-0.1-jitter"}).attack == "ipm-0.1-jitter"
    for bad in ("label-flip-jitter", "min-sum-jitter-jitter"):
        with pytest.raises(ConfigError, match="'attack' must be one of"):
            parse_run_config({"attack": bad})


def test_the_largest_seed_still_seeds_every_client():
    import torch

    from softmerge.client.app import local_seed
    from softmerge.simulations.config import MAX_SEED

    settings = parse_run_config({"seed": MAX_SEED})
    largest = local_seed(settings.seed, 10**6, 10**6)
    assert 0 <= largest < 2**63
    torch.manual_seed(largest)  # raises on overflow
    # Every client of every round trains on a seed of its own (up to a thousand clients).
    seeds = {local_seed(settings.seed, server_round, partition) for server_round in range(100)
             for partition in range(1000)}
    assert len(seeds) == 100 * 1000
    assert local_seed(0, 1, 0) != local_seed(1, 1, 0)


def test_strings_from_the_command_line_are_coerced():
    settings = parse_run_config({"softmerge-keep": "false", "seed": 3.0})
    assert settings.softmerge_keep is False and settings.seed == 3


def test_cli_rejects_bad_config_before_any_run(capsys, tmp_path):
    from softmerge.simulations.cli import main

    assert main(["--attack", "teleport", "--output", str(tmp_path)]) == 2
    assert "'attack' must be one of" in capsys.readouterr().err
    assert main(["--malicious", "12", "--clients", "10", "--output", str(tmp_path)]) == 2
    assert "do not exist with 10 clients" in capsys.readouterr().err
    assert main(["--set", "softmerge-mode", "--output", str(tmp_path)]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err


def test_a_claimed_example_count_the_server_would_screen_out_is_refused():
    """Above the server's bound every malicious reply would be dropped: an attack that reads as failed clients."""
    from softmerge.server.replies import MAX_NUM_EXAMPLES

    assert parse_run_config({"attack-claimed-examples": MAX_NUM_EXAMPLES}).attack_claimed_examples == MAX_NUM_EXAMPLES
    with pytest.raises(ConfigError, match="'attack-claimed-examples' must be in"):
        parse_run_config({"attack-claimed-examples": 2 * MAX_NUM_EXAMPLES})


def test_a_backdoor_target_outside_the_classes_is_refused():
    assert parse_run_config({"backdoor-target": 9}).backdoor_target == 9
    with pytest.raises(ConfigError, match=r"'backdoor-target' must be a class of digits \(0..9\); got 10"):
        parse_run_config({"backdoor-target": 10})


@pytest.mark.parametrize("clients, config, message", [
    (1, {}, "at least min-nodes = 2 clients"),
    (2, {"min-nodes": 3}, "at least min-nodes = 3 clients"),
    (4, {"malicious-partitions": "1,7"}, r"ids \[7\] do not exist with 4 clients"),
    (10, {"strategy": "bulyan", "assumed-malicious": 3}, r"Bulyan needs n >= 4f \+ 3 \(n=10, f=3\)"),
    (20, {"strategy": "bulyan", "assumed-malicious": 4, "fraction-train": 0.5},
     r"10 replies a round: Bulyan needs"),
    (6, {"strategy": "krum", "assumed-malicious": 2, "malicious-partitions": "0"}, r"Krum needs n >= 2f \+ 3"),
    (4, {"attack": "sign-flip", "malicious-partitions": ""}, "no malicious partition would run unattacked"),
    (10, {"client-pool-size": 5}, "client-pool-size 5 is too small for 10 clients of at least 2 examples"),
    # The oracle drops the malicious replies before the rule sees them: 7 sampled, 5 honest.
    (7, {"strategy": "bulyan", "assumed-malicious": 1, "malicious-partitions": "0,1", "exclude-malicious": True},
     r"5 replies a round \(after the oracle drops the malicious ones, at worst every one of them\): Bulyan needs"),
])
def test_a_simulation_that_could_not_run_is_refused_before_it_starts(clients, config, message):
    """One client waited forever for Flower's second; Bulyan on too few replies never aggregated."""
    from softmerge.simulations.config import check_simulation

    with pytest.raises(ConfigError, match=message):
        check_simulation(parse_run_config(config), clients)


def test_a_simulation_that_can_run_passes_the_check():
    from softmerge.simulations.config import check_simulation

    check_simulation(parse_run_config({"strategy": "bulyan", "assumed-malicious": 1}), 10)
    check_simulation(parse_run_config({"strategy": "krum", "assumed-malicious": 3, "malicious-partitions": "0"}), 9)
    check_simulation(parse_run_config({"malicious-partitions": "1"}), 2)
    check_simulation(parse_run_config({"client-pool-size": 20}), 10)
    check_simulation(parse_run_config({"attack": "none", "malicious-partitions": ""}), 2)
    check_simulation(parse_run_config({"attack": "none", "malicious-partitions": "", "min-nodes": 1}), 1)
    # Flower trains max(int(0.3 * 10), min-nodes) = 7 a round: enough for Krum with f = 2.
    check_simulation(parse_run_config({"strategy": "krum", "assumed-malicious": 2, "fraction-train": 0.3,
                                       "min-nodes": 7}), 10)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("nodes", "fraction", "min_nodes"), [(10, 0.2, 5), (3, 0.5, 1), (10, 1.0, 2), (20, 0.5, 2),
                                                              (7, 0.1, 3)])
def test_the_replies_a_round_averages_are_the_nodes_flower_samples(nodes, fraction, min_nodes):
    """The scaling attack's and model replacement's gamma, and the Krum/Bulyan check, read this count."""
    from flwr.app import ArrayRecord, ConfigRecord

    from flower_helpers import StubGrid
    from softmerge.server.strategies import build_strategy
    from softmerge.simulations.config import replies_per_round
    from softmerge.simulations.config import task_data
    from softmerge.simulations.tasks import build_model

    settings = parse_run_config({"strategy": "fedavg", "fraction-train": fraction, "min-nodes": min_nodes})
    model = build_model(settings.dataset)
    strategy = build_strategy(settings, model, task_data(settings).gate.tensors())
    sent = strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), StubGrid(range(1, nodes + 1)))
    assert replies_per_round(settings, nodes) == len(list(sent))


def test_softmerge_run_reports_a_simulation_that_could_not_run(capsys):
    from softmerge.simulations.run import main

    assert main(["--clients", "1"]) == 2
    assert "at least min-nodes = 2 clients" in capsys.readouterr().err


def test_cli_reports_a_missing_dataset(capsys, tmp_path):
    from softmerge.simulations.cli import main

    code = main(["--dataset", "fashion-mnist", "--set", f"dataset-path={tmp_path}", "--output", str(tmp_path / "o")])
    assert code == 2
    assert "Fashion-MNIST file train-images-idx3-ubyte[.gz] not found" in capsys.readouterr().err


def test_cli_reports_an_output_it_cannot_create(capsys, tmp_path):
    from softmerge.simulations.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["--rounds", "1", "--output", str(blocker / "demo")]) == 2
    assert "softmerge-sim: cannot write to --output" in capsys.readouterr().err


def test_cli_refuses_another_configs_checkpoint_before_running_or_rewriting_the_summary(capsys, tmp_path):
    import numpy as np

    from softmerge.server.checkpoint import save_checkpoint
    from softmerge.simulations.cli import main

    save_checkpoint(tmp_path / "softmerge-attack", 1, {"w": np.ones(2, np.float32)}, "another config's fingerprint")
    (tmp_path / "summary.json").write_text('{"runs": {"earlier": {}}}')
    assert main(["--rounds", "1", "--output", str(tmp_path)]) == 2
    assert "softmerge-attack:" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == '{"runs": {"earlier": {}}}'
    assert not (tmp_path / "fedavg-clean").exists()  # nothing ran


def test_cli_refuses_a_checkpoint_of_another_client_count_before_running(capsys, tmp_path):
    import numpy as np

    from softmerge.server.checkpoint import config_fingerprint, save_checkpoint
    from softmerge.simulations.cli import RUNS, _run_settings, main
    from softmerge.simulations.config import parse_run_config, to_run_config

    # The checkpoint softmerge-sim --rounds 1 itself would write for its first run, had it had 10 clients.
    base = parse_run_config({"num-server-rounds": 1})
    name, strategy, attacked = RUNS[0]
    settings = _run_settings(base, tmp_path, strategy, attacked, name)
    save_checkpoint(tmp_path / name, 1, {"w": np.ones(2, np.float32)}, config_fingerprint(to_run_config(settings)),
                    {"nodes": 10})
    assert main(["--rounds", "1", "--clients", "12", "--output", str(tmp_path)]) == 2
    assert "a run with 10 clients, this run has 12" in capsys.readouterr().err
    assert not (tmp_path / RUNS[1][0]).exists()  # nothing ran


@pytest.mark.parametrize("clients, config, message", [
    (700, {}, r"the client pool holds 1237 digits examples .* too few for 700 clients"),
    (5, {"server-gate-size": 1430}, r"the client pool holds 7 digits examples .* too few for 5 clients"),
    (30, {"partitioning": "dirichlet", "dirichlet-alpha": 0.01}, r"no dirichlet split of the 1237 pool examples"),
    (10, {"client-pool-size": 5000}, r"client-pool-size 5000 is more than the 1237 digits examples"),
])
def test_a_pool_the_clients_cannot_split_is_named_before_a_run(clients, config, message):
    """Otherwise every client fails to load its partition, and the run fails only after its last round."""
    from softmerge.simulations.config import dataset_problem

    problem = dataset_problem(parse_run_config(config), clients)
    assert problem is not None and re.search(message, problem), problem
    assert dataset_problem(parse_run_config({}), 10) is None


def test_softmerge_run_names_an_unsplittable_pool_before_starting_flower(capsys):
    from softmerge.simulations.run import main

    assert main(["--clients", "700", "--set", "output-dir=/nonexistent/never-written"]) == 2
    assert "softmerge-run: dataset error: the client pool holds 1237 digits examples" in capsys.readouterr().err


def test_set_options_keep_text_for_text_settings_and_type_the_rest():
    from softmerge.simulations.config import parse_set_options

    config = parse_set_options(["output-dir=2026_12_08", "dataset-path = 007", "malicious-partitions=3",
                                "num-server-rounds=5", "fraction-train=0.5", "resume=false", "extreme-values=1e3"])
    assert config == {"output-dir": "2026_12_08", "dataset-path": "007", "malicious-partitions": "3",
                      "num-server-rounds": 5, "fraction-train": 0.5, "resume": False, "extreme-values": "1e3"}
    assert parse_run_config(config).output_dir == "2026_12_08"
    with pytest.raises(ConfigError, match="--set takes KEY=VALUE, got 'rounds'"):
        parse_set_options(["rounds"])
    with pytest.raises(ConfigError, match="--set seed: use --seeds"):
        parse_set_options(["seed=1"], reserved={"seed": "use --seeds"})


@pytest.mark.parametrize("key", ["strategy=krum", "output-dir=elsewhere", "exclude-malicious=true"])
def test_softmerge_sim_refuses_the_keys_its_three_runs_set(key):
    """They were silently overwritten (strategy, output-dir) or mislabelled a run (the oracle as 'attack')."""
    from softmerge.simulations.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["--set", key])
    with pytest.raises(ConfigError, match=f"--set {key.split('=')[0]}: .*(softmerge-run|--output)"):
        settings_from_args(args)
    # Every other key still goes through.
    assert settings_from_args(build_parser().parse_args(["--set", "softmerge-mode=select"])).softmerge_mode == "select"
