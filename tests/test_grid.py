"""The benchmark grid: planning, n/a rules, tables, and resuming a finished grid."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from softmerge.simulations.grid import (Cell, format_percent, main, malicious_ids, not_applicable, plan_cells,
                                         summarise_cell, write_tables)


def test_plan_and_rules_that_cannot_run():
    cells = plan_cells(["softmerge", "bulyan"], ["none", "alie"], [0.2, 0.4], [0], oracle=True)
    assert len(cells) == 2 * 2 * 2 + 2
    assert malicious_ids(20, 0.4) == list(range(8))
    assert "4f + 3" in not_applicable(Cell("bulyan", "alie", 0.4, 0), 20)  # f=8 needs n >= 35
    assert not_applicable(Cell("bulyan", "alie", 0.2, 0), 20) is None  # f=4 needs n >= 19
    assert not_applicable(Cell("fedtrimmedavg", "alie", 0.6, 0), 20)
    assert not_applicable(Cell("softmerge", "alie", 0.8, 0), 20) is None


def test_the_trimmed_mean_trims_at_least_the_malicious_share(tmp_path):
    # As Krum is told the true f: a trimmed mean left at beta 0.2 against 8 attackers of 20
    # averages 4 of them into every coordinate, which measures a misconfigured rule.
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.grid import cell_settings, fraction_free, trim_beta_for

    settings = parse_run_config({"dataset": "digits", "trim-beta": 0.2})
    beta = {f: cell_settings(settings, Cell("fedtrimmedavg", "alie", f, 0), 20, tmp_path).trim_beta
            for f in (0.1, 0.2, 0.4)}
    assert beta == {0.1: 0.2, 0.2: 0.2, 0.4: 0.4}
    assert trim_beta_for(0.45, 8, 20) == 0.45  # a larger configured beta stands
    assert trim_beta_for(0.2, 12, 20) == 0.2  # a majority cannot be trimmed: the cell is n/a
    # Flower cuts int(beta * n) per side; 29 / 100 * 100 is 28.999999999999996 in floats.
    for clients in range(2, 101):
        for attackers in range(1, (clients + 1) // 2):
            beta = trim_beta_for(0.0, attackers, clients)
            assert beta < 0.5 and int(beta * clients) == attackers, (attackers, clients, beta)
    assert not_applicable(Cell("fedtrimmedavg", "alie", 0.6, 0), 20)
    # Its no-attack run now depends on the fraction, so it is not shared across fractions.
    assert not fraction_free(Cell("fedtrimmedavg", "none", 0.4, 0))
    assert fraction_free(Cell("fedavg", "none", 0.4, 0))


def test_tables_show_oracle_worst_case_and_na(tmp_path):
    rows = [
        {"strategy": "softmerge", "attack": "none", "fraction": 0.2, "status": "finished", "final_accuracy": 0.9,
         "last3_accuracy": 0.88, "final_backdoor_asr": None, "malicious_weight": 0.1},
        {"strategy": "softmerge", "attack": "alie", "fraction": 0.2, "status": "finished", "final_accuracy": 0.8,
         "last3_accuracy": 0.83, "final_backdoor_asr": None, "malicious_weight": 0.0},
        {"strategy": "bulyan", "attack": "none", "fraction": 0.2, "status": "n/a", "final_accuracy": None},
        {"strategy": "bulyan", "attack": "alie", "fraction": 0.2, "status": "n/a", "final_accuracy": None},
        {"strategy": "oracle", "attack": "none", "fraction": 0.2, "status": "finished", "final_accuracy": 0.85},
    ]
    path = tmp_path / "tables.md"
    write_tables(rows, ["softmerge", "bulyan", "oracle"], ["none", "alie"], [0.2], path, "## test")
    text = path.read_text()
    assert "| softmerge | 90.0 | 80.0 | 80.0 |" in text
    # The last-3-round table has its own worst case; the oracle row has no such figure here.
    assert "### Test accuracy (%), mean of the last 3 rounds, 20% malicious" in text
    assert "| softmerge | 88.0 | 83.0 | 83.0 |" in text
    assert "| bulyan | n/a | n/a | n/a |" in text
    assert "| **oracle** (FedAvg, honest clients only) | 85.0 | 85.0 | 85.0 |" in text
    assert "| 20% | 10.0 | 0.0 |" in text


def test_cell_summary_has_the_final_and_the_last_three_rounds_accuracy():
    rounds = [{"round": 0, "test_accuracy": 0.1}] + [{"round": r, "test_accuracy": a}
                                                     for r, a in enumerate([0.5, 0.7, 0.8, 0.9, 0.6], start=1)]
    row = summarise_cell(Cell("fedavg", "none", 0.2, 0), {"rounds": rounds}, 20, "finished", 1.0)
    assert row["final_accuracy"] == 0.6
    assert row["last3_accuracy"] == pytest.approx((0.8 + 0.9 + 0.6) / 3)
    # Fewer trained rounds than three: their mean, never the untrained round 0.
    short = summarise_cell(Cell("fedavg", "none", 0.2, 0), {"rounds": rounds[:3]}, 20, "finished", 1.0)
    assert short["last3_accuracy"] == pytest.approx(0.6)


def test_cell_summary_has_the_mean_and_spread_of_the_last_ten_rounds():
    accuracies = [0.5, 0.6] + [0.8, 0.9] * 5  # 12 trained rounds; the last 10 alternate 0.8, 0.9
    rounds = [{"round": 0, "test_accuracy": 0.1}] + [{"round": r, "test_accuracy": a}
                                                     for r, a in enumerate(accuracies, start=1)]
    row = summarise_cell(Cell("fedavg", "none", 0.2, 0), {"rounds": rounds}, 20, "finished", 1.0)
    assert row["last10_accuracy"] == pytest.approx(0.85)
    assert row["spread10_accuracy"] == pytest.approx(0.05)
    # Round 0 (untrained) never counts, and a run shorter than the window has no such figure.
    short = summarise_cell(Cell("fedavg", "none", 0.2, 0), {"rounds": rounds[:10]}, 20, "finished", 1.0)
    assert short["last10_accuracy"] is None and short["spread10_accuracy"] is None


def _summary_row(strategy, attack, fraction, final, last3=None, last10=None, spread=None, status="finished",
                 seed=0):
    """A cells.json row with the columns the summary tables read."""
    return {"strategy": strategy, "attack": attack, "fraction": fraction, "seed": seed, "status": status,
            "final_accuracy": final, "last3_accuracy": last3, "last10_accuracy": last10,
            "spread10_accuracy": spread, "final_backdoor_asr": None, "malicious_weight": None}


def test_summary_counts_attacked_cells_within_a_point_of_the_oracle_per_statistic(tmp_path):
    row = _summary_row
    rows = [row("oracle", "none", 0.2, 0.85, 0.84, 0.83, 0.010),
            row("softmerge", "none", 0.2, 0.90, 0.90, 0.90, 0.002),  # no attack: not in the worst case
            # final 0.83 is 2 points under the oracle's final round, but its last-10 mean 0.83 is level
            row("softmerge", "alie", 0.2, 0.83, 0.835, 0.83, 0.010),
            row("softmerge", "fang", 0.2, 0.80, 0.80, 0.82, 0.030),  # exactly 1 point under on the last 10
            row("bulyan", "alie", 0.2, None, status="n/a"),
            row("bulyan", "fang", 0.2, None, status="n/a")]
    path = tmp_path / "tables.md"
    write_tables(rows, ["softmerge", "bulyan", "oracle"], ["none", "alie", "fang"], [0.2], path, "## test")
    text = path.read_text()
    assert "| **oracle** | final round | 85.0 |" in text
    assert "| **oracle** | mean of last 10 | 83.0 |" in text
    assert "| softmerge | final round | 80.0 (0/2) |" in text
    assert "| softmerge | mean of last 3 | 80.0 (1/2) |" in text
    assert "| softmerge | mean of last 10 | 82.0 (2/2) |" in text
    assert "| bulyan | final round | n/a |" in text
    # The spread table: the oracle's own cell, the median over the defense's attacked cells.
    assert "| **oracle** | 1.00 |" in text
    assert "| softmerge | 2.00 |" in text
    assert "| bulyan | n/a |" in text


def test_summary_marks_partial_and_failed_and_compares_unrounded_figures(tmp_path):
    def row(strategy, attack, final, status="finished", seed=0):
        # Every statistic the same, so the final-round line stands for all three.
        spread = 0.01 if status == "finished" else None
        return _summary_row(strategy, attack, 0.4, final, final, final, spread, status=status, seed=seed)
    rows = [row("oracle", "none", 0.8249),  # printed 82.5
            row("softmerge", "alie", 0.8150),  # printed 81.5, yet 0.99 under: within
            row("fedavg", "fang", 0.8148),  # printed 81.5 too, but 1.01 under: not within
            row("softmerge", "fang", 0.70), row("softmerge", "fang", 0.80, seed=1),  # two seeds: 75.0
            row("fedavg", "alie", 0.9),
            row("krum", "alie", None, status="failed"), row("krum", "fang", None, status="failed")]
    path = tmp_path / "tables.md"
    write_tables(rows, ["softmerge", "fedavg", "krum", "oracle"], ["none", "alie", "fang"], [0.4], path, "## t")
    text = path.read_text()
    # fang has two seeds, alie one, the oracle one: the worst case compares unlike means, and says so.
    assert "| softmerge | final round | 75.0 (1/2) [1-2 seeds; oracle 1] |" in text
    assert "| fedavg | final round | 81.5 (1/2) |" in text  # one seed everywhere: no mark
    assert "| krum | final round | failed |" in text
    assert "| krum | failed |" in text  # the spread table too


def test_a_failed_seed_is_named_and_makes_the_worst_case_partial(tmp_path):
    def row(strategy, attack, final, status="finished", seed=0):
        return _summary_row(strategy, attack, 0.4, final, final, final, 0.01 if final else None, status=status,
                            seed=seed)
    # Seed 1 of sign-flip failed: the mean of seed 0 alone must not pass for the cell's figure.
    rows = [row("oracle", "none", 0.84), row("oracle", "none", 0.84, seed=1),
            row("softmerge", "none", 0.50), row("softmerge", "none", 0.50, seed=1),
            row("softmerge", "sign-flip", 0.84), row("softmerge", "sign-flip", None, status="failed", seed=1),
            row("softmerge", "alie", 0.83), row("softmerge", "alie", 0.835, seed=1)]
    path = tmp_path / "tables.md"
    write_tables(rows, ["softmerge", "oracle"], ["none", "sign-flip", "alie"], [0.4], path, "## t")
    text = path.read_text()
    assert "| softmerge | 50.0 (±0.0, 2 seeds) | 84.0 (1 failed) | 83.3 (±0.5, 2 seeds) | 83.3 (partial) |" in text
    # No attack (50.0) is not a case of an attack: the worst case is over the attacks, as in the summary.
    assert "| softmerge | final round | 83.3 (2/2) partial [1-2 seeds; oracle 2] |" in text


def test_figures_round_half_up_on_the_decimal_they_stand_for():
    from softmerge.simulations.grid import format_percent

    # Means of three accuracies in 1/2000 steps: the binary float of 0.8335 lies below it.
    assert format_percent((0.8445 + 0.8175 + 0.8385) / 3) == "83.4"
    assert format_percent(0.8555) == "85.6" and format_percent(0.85549) == "85.5"
    assert format_percent(0.004, digits=2) == "0.40" and format_percent(None) == "-"


def test_grid_refuses_to_mix_in_cells_another_invocation_ran_with_other_settings(tmp_path, capsys):
    # An earlier grid on this output finished a cell this one does not plan; the tables
    # would put it beside this grid's cells, so its settings must match too.
    from softmerge.simulations.config import parse_run_config

    old = parse_run_config({"dataset": "digits", "num-server-rounds": 1, "partitioning": "dirichlet"})
    _finished_cell(tmp_path, Cell("fedavg", "none", 0.2, 0), old)
    common = ["--dataset", "digits", "--clients", "10", "--strategies", "fedavg", "--fractions", "0.2",
              "--no-oracle", "--output", str(tmp_path)]
    assert main(common + ["--rounds", "1", "--attacks", "none", "--tables-only"]) == 0
    assert main(common + ["--rounds", "2", "--attacks", "sign-flip", "--tables-only"]) == 2
    assert "fedavg__none__f0.2__s0: num-server-rounds: 1 there, 2 here" in capsys.readouterr().err


def test_a_failed_row_stays_while_its_directory_does_and_goes_with_it(tmp_path):
    from softmerge.simulations.config import parse_run_config

    settings = parse_run_config({"dataset": "digits", "num-server-rounds": 1, "partitioning": "dirichlet"})
    _finished_cell(tmp_path, Cell("fedavg", "sign-flip", 0.2, 0), settings)
    (tmp_path / "cells" / "fedavg__sign-flip__f0.2__s1").mkdir(parents=True)
    failed = {**_summary_row("fedavg", "sign-flip", 0.2, None, status="failed", seed=1),
              "key": "fedavg__sign-flip__f0.2__s1"}
    finished = {**_summary_row("fedavg", "sign-flip", 0.2, 0.6), "key": "fedavg__sign-flip__f0.2__s0"}
    (tmp_path / "cells.json").write_text(json.dumps([finished, failed]))
    argv = ["--dataset", "digits", "--clients", "10", "--rounds", "1", "--strategies", "fedavg", "--attacks",
            "sign-flip", "--fractions", "0.2", "--no-oracle", "--output", str(tmp_path), "--tables-only"]
    assert main(argv) == 0
    assert "| fedavg | 60.0 (1 failed) | 60.0 (partial) |" in (tmp_path / "tables.md").read_text()
    # Dropping the seed (deleting its directory) takes the failure out of the tables.
    (tmp_path / "cells" / "fedavg__sign-flip__f0.2__s1").rmdir()
    assert main(argv) == 0
    assert "| fedavg | 60.0 | 60.0 |" in (tmp_path / "tables.md").read_text()
    assert [row["key"] for row in json.loads((tmp_path / "cells.json").read_text())] == ["fedavg__sign-flip__f0.2__s0"]


def test_the_merge_thread_count_is_a_setting_the_cells_of_one_output_share(tmp_path, capsys):
    # A resume may change it (it is operational there), but it moves a merge's last bits.
    from softmerge.simulations.config import parse_run_config

    settings = parse_run_config({"dataset": "digits", "num-server-rounds": 1, "partitioning": "dirichlet"})
    _finished_cell(tmp_path, Cell("softmerge", "none", 0.2, 0), settings)
    argv = ["--dataset", "digits", "--clients", "10", "--rounds", "1", "--strategies", "softmerge", "--attacks",
            "none", "--fractions", "0.2", "--no-oracle", "--output", str(tmp_path), "--tables-only"]
    assert main(argv) == 0
    assert main(argv + ["--set", "softmerge-threads=2"]) == 2
    assert "softmerge-threads: 1 there, 2 here" in capsys.readouterr().err


def test_a_recorded_cell_this_grid_could_not_run_is_still_checked(tmp_path, capsys):
    # Krum at 40% of 20 clients, recorded by another grid; this one has 10 clients, where
    # Krum cannot run at 40%, yet the tables would still show the old row.
    from softmerge.simulations.config import parse_run_config

    settings = parse_run_config({"dataset": "digits", "num-server-rounds": 1, "partitioning": "dirichlet"})
    _finished_cell(tmp_path, Cell("krum", "sign-flip", 0.4, 0), settings)
    path = tmp_path / "cells" / "krum__sign-flip__f0.4__s0" / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "nodes": 20}))
    row = {**_summary_row("krum", "sign-flip", 0.4, 0.6), "key": "krum__sign-flip__f0.4__s0"}
    (tmp_path / "cells.json").write_text(json.dumps([row]))
    argv = ["--dataset", "digits", "--clients", "10", "--rounds", "1", "--strategies", "fedavg", "--attacks",
            "none", "--fractions", "0.2", "--no-oracle", "--output", str(tmp_path), "--tables-only"]
    assert main(argv) == 2
    assert "krum__sign-flip__f0.4__s0: clients: 20 there, 10 here" in capsys.readouterr().err


def test_figures_that_are_not_accuracies_still_print():
    from softmerge.simulations.grid import format_percent

    assert format_percent(float("nan")) == "nan" and format_percent(float("inf")) == "inf"
    assert format_percent(1e30) == f"{1e32:.1f}"


def test_grid_takes_no_abbreviated_options(capsys, tmp_path):
    # A worker's command line is the grid's without --jobs; "--job 2" would reach it and spawn more workers.
    with pytest.raises(SystemExit):
        main(["--job", "2", "--output", str(tmp_path)])
    assert "unrecognized arguments: --job" in capsys.readouterr().err


def test_grid_rejects_unknown_names(capsys, tmp_path):
    assert main(["--strategies", "softmerge,zeno", "--output", str(tmp_path)]) == 2
    assert "'strategy' must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("seeds", ["0,-1", "4294967296"])
def test_grid_rejects_a_seed_no_run_can_take(capsys, tmp_path, seeds):
    # Before, every cell of such a seed started Flower and failed deep in numpy.
    argv = ["--dataset", "digits", "--clients", "4", "--strategies", "fedavg", "--attacks", "none",
            "--fractions", "0.25", "--seeds", seeds, "--output", str(tmp_path / "grid")]
    assert main(argv) == 2
    assert "'seed' must be in [0, 4294967295]" in capsys.readouterr().err
    assert main([*argv, "--plan"]) == 2


def test_grid_names_a_missing_dataset_once_before_any_cell_runs(capsys, tmp_path):
    argv = ["--dataset", "fashion-mnist", "--set", f"dataset-path={tmp_path}", "--clients", "4", "--rounds", "1",
            "--strategies", "fedavg,softmerge", "--attacks", "none", "--fractions", "0.25",
            "--output", str(tmp_path / "grid")]
    assert main(argv) == 2
    assert "dataset error: Fashion-MNIST file train-images-idx3-ubyte[.gz] not found" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()
    # Tables from finished cells need no dataset.
    assert main([*argv, "--tables-only"]) == 0


def test_grid_names_a_pool_its_clients_cannot_split_before_any_cell_runs(capsys, tmp_path):
    """Every seed and alpha draws its own split; one that cannot give each client two examples stops the grid."""
    argv = ["--dataset", "digits", "--clients", "30", "--rounds", "1", "--strategies", "fedavg", "--attacks", "none",
            "--fractions", "0.1", "--alpha", "0.5,0.01", "--output", str(tmp_path / "grid")]
    assert main(argv) == 2
    assert "dataset error (seed 0, alpha 0.01): no dirichlet split of the 1237 pool examples into 30 clients" \
        in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


@pytest.mark.slow
def test_grid_runs_through_flower_and_resumes_without_rerunning(tmp_path):
    argv = ["--dataset", "digits", "--clients", "4", "--rounds", "1", "--strategies", "softmerge,fedavg",
            "--attacks", "ipm-100", "--fractions", "0.25", "--output", str(tmp_path)]
    assert main(argv) == 0
    rows = {row["key"]: row for row in json.loads((tmp_path / "cells.json").read_text())}
    assert set(rows) == {"softmerge__ipm-100__f0.25__s0", "fedavg__ipm-100__f0.25__s0", "oracle__none__f0.25__s0"}
    assert all(row["status"] == "finished" for row in rows.values())
    # The share of merged weight on the attacker's candidate, as its round's gates record it.
    softmerge_run = json.loads((tmp_path / "cells" / "softmerge__ipm-100__f0.25__s0" / "results.json").read_text())
    (attacker,) = (f"client-{i}" for i in malicious_ids(4, 0.25))
    gates = softmerge_run["rounds"][-1]["gates"]
    on_attacker = sum(unit[gates["candidates"].index(attacker)] for unit in gates["weights"]) / len(gates["units"])
    assert rows["softmerge__ipm-100__f0.25__s0"]["malicious_weight"] == pytest.approx(on_attacker)
    assert 0.0 <= on_attacker <= 1.0
    stamp = (tmp_path / "cells" / "fedavg__ipm-100__f0.25__s0" / "results.json").stat().st_mtime_ns
    # The run records how many clients took part: its run config does not say.
    assert json.loads((tmp_path / "cells" / "fedavg__ipm-100__f0.25__s0" / "results.json").read_text())["nodes"] == 4
    assert main(argv) == 0
    assert (tmp_path / "cells" / "fedavg__ipm-100__f0.25__s0" / "results.json").stat().st_mtime_ns == stamp
    assert "ipm-100" in (tmp_path / "tables.md").read_text()
    assert (tmp_path / "plots" / "accuracy__ipm-100__f0.25.png").is_file()
    assert (tmp_path / "plots" / "gates__ipm-100__f0.25.png").is_file()
    assert (tmp_path / "plots" / "gates_by_round__ipm-100__f0.25.png").is_file()


def test_an_unreadable_cells_file_is_named_and_written_again(tmp_path, capsys):
    from argparse import Namespace

    from softmerge.simulations.config import RunSettings
    from softmerge.simulations.grid import _write_outputs

    (tmp_path / "cells.json").write_text('[{"key": "fedavg__alie__f0.2__s0", "stat')  # cut short
    row = {"key": "fedavg__alie__f0.2__s0", "strategy": "fedavg", "attack": "alie", "fraction": 0.2, "seed": 0,
           "status": "failed", "final_accuracy": None, "final_backdoor_asr": None, "malicious_weight": None,
           "seconds": 1.0}
    _write_outputs(tmp_path, [row], ["fedavg"], ["alie"], [0.2], Namespace(clients=20), RunSettings())
    assert "cells.json is unreadable" in capsys.readouterr().err
    assert [r["key"] for r in json.loads((tmp_path / "cells.json").read_text())] == [row["key"]]


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2]", b'"finished"', b'{"status": "finis'])
def test_a_damaged_cell_results_file_is_a_cell_to_run_again(tmp_path, content):
    # Before, bytes that are not UTF-8 or JSON that is not an object stopped the whole grid
    # (tables-only too) with a traceback.
    from softmerge.simulations.grid import finished_cell, no_attack_twin

    cell = Cell("fedavg", "none", 0.2, 0)
    (tmp_path / "cells" / cell.key).mkdir(parents=True)
    (tmp_path / "cells" / cell.key / "results.json").write_bytes(content)
    assert finished_cell(tmp_path, cell) is None
    assert no_attack_twin(tmp_path, Cell("fedavg", "none", 0.4, 0), {}, 20) is None


def test_a_cells_file_that_is_not_text_or_has_a_row_without_its_cell_is_written_again(tmp_path, capsys):
    from argparse import Namespace

    from softmerge.simulations.config import RunSettings
    from softmerge.simulations.grid import _write_outputs

    row = {"key": "fedavg__alie__f0.2__s0", "strategy": "fedavg", "attack": "alie", "fraction": 0.2, "seed": 0,
           "status": "failed", "final_accuracy": None, "final_backdoor_asr": None, "malicious_weight": None,
           "seconds": 1.0}
    (tmp_path / "cells.json").write_bytes(b"\xff\xfe[")
    _write_outputs(tmp_path, [row], ["fedavg"], ["alie"], [0.2], Namespace(clients=20), RunSettings())
    assert "cells.json is unreadable" in capsys.readouterr().err
    # A finished row that does not say which cell it is (no strategy, or a fraction as text)
    # cannot be put in a table.
    (tmp_path / "cells.json").write_text(json.dumps([
        {"key": "krum__alie__f0.2__s0", "status": "finished"},
        {"key": "geomed__alie__f0.4__s0", "strategy": "geomed", "attack": "alie", "fraction": "0.4", "seed": 0,
         "status": "failed"}]))
    _write_outputs(tmp_path, [row], ["fedavg"], ["alie"], [0.2], Namespace(clients=20), RunSettings())
    assert ("rows that do not name their cell, left out of the tables: krum__alie__f0.2__s0, geomed__alie__f0.4__s0"
            in capsys.readouterr().err)
    assert [r["key"] for r in json.loads((tmp_path / "cells.json").read_text())] == [row["key"]]


def test_tables_forget_a_finished_cell_whose_directory_was_deleted(tmp_path):
    # Deleting a cell's directory is how a cell is rerun after a change to a defense; until it
    # has run again, its old figures must not stay in the tables.
    from argparse import Namespace

    from softmerge.simulations.config import RunSettings
    from softmerge.simulations.grid import _write_outputs

    def row(key, status, accuracy):
        strategy, attack, fraction, _ = key.split("__")
        return {"key": key, "strategy": strategy, "attack": attack, "fraction": float(fraction[1:]),
                "seed": 0, "status": status, "final_accuracy": accuracy, "final_backdoor_asr": None,
                "malicious_weight": None, "seconds": 1.0}

    kept, deleted, failed = "fedavg__alie__f0.2__s0", "softmerge__alie__f0.2__s0", "fltrust__alie__f0.2__s0"
    (tmp_path / "cells" / kept).mkdir(parents=True)
    (tmp_path / "cells" / kept / "results.json").write_text('{"status": "finished"}')
    (tmp_path / "cells" / failed).mkdir()  # a failed run leaves its directory (its log), and keeps its row
    (tmp_path / "cells.json").write_text(json.dumps([row(kept, "finished", 0.8), row(deleted, "finished", 0.7),
                                                     row(failed, "failed", None)]))
    _write_outputs(tmp_path, [], ["softmerge", "fedavg", "fltrust"], ["alie"], [0.2], Namespace(clients=20),
                   RunSettings())
    keys = {r["key"] for r in json.loads((tmp_path / "cells.json").read_text())}
    assert keys == {kept, failed}
    assert "70.0" not in (tmp_path / "tables.md").read_text()
    # A grid that passed over a cell while another grid ran it writes it as running; the
    # other grid has since finished it, and its row stays.
    before = {r["key"]: r for r in json.loads((tmp_path / "cells.json").read_text())}
    _write_outputs(tmp_path, [row(kept, "running", None)], ["fedavg"], ["alie"], [0.2], Namespace(clients=20),
                   RunSettings())
    after = {r["key"]: r for r in json.loads((tmp_path / "cells.json").read_text())}
    assert after[kept]["status"] == "finished" and after[kept] == before[kept]


def test_tables_only_rebuilds_the_tables_from_the_cells_on_disk_and_runs_nothing(tmp_path):
    key = "fedavg__none__f0.2__s0"
    (tmp_path / "cells" / key).mkdir(parents=True)
    rounds = [{"round": r, "test_accuracy": a} for r, a in enumerate([0.1, 0.6, 0.7, 0.8])]
    (tmp_path / "cells" / key / "results.json").write_text(json.dumps({"status": "finished", "rounds": rounds}))
    # A cell of another invocation, summarised by an older runner: no last3_accuracy column.
    other = "fedavg__none__f0.4__s0"
    (tmp_path / "cells" / other).mkdir(parents=True)
    (tmp_path / "cells" / other / "results.json").write_text(json.dumps({"status": "finished", "rounds": rounds}))
    old_row = {"strategy": "fedavg", "attack": "none", "seed": 0, "status": "finished", "final_accuracy": 0.8,
               "seconds": 42.0}
    (tmp_path / "cells.json").write_text(json.dumps([{"key": other, "fraction": 0.4, **old_row},
                                                     {"key": key, "fraction": 0.2, **old_row}]))
    argv = ["--dataset", "digits", "--clients", "10", "--strategies", "fedavg,softmerge", "--attacks", "none",
            "--fractions", "0.2", "--output", str(tmp_path), "--tables-only"]
    assert main(argv) == 0
    rows = {row["key"]: row for row in json.loads((tmp_path / "cells.json").read_text())}
    assert set(rows) == {key, other}  # neither the softmerge cell nor the oracle ran
    assert "last3_accuracy" in (tmp_path / "cells.csv").read_text().splitlines()[0]
    assert rows[key]["last3_accuracy"] == pytest.approx(0.7)
    assert rows[key]["seconds"] == 42.0
    assert not (tmp_path / "cells" / "softmerge__none__f0.2__s0").exists()
    assert not (tmp_path / "grid.json").exists()  # it records the runs, and this was none
    assert "| fedavg | 70.0 | - |" in (tmp_path / "tables.md").read_text()  # no attack: no worst attack
    # The older runner's row is summarised again from its results file: no column is missing.
    assert rows[other]["last3_accuracy"] == pytest.approx(0.7) and "last10_accuracy" in rows[other]


def test_weights_by_round_heatmap_skips_rounds_whose_candidates_differ(tmp_path):
    from softmerge.simulations.grid import _plot_weights_by_round, weights_by_round

    candidates = ["client-0", "client-1", "keep"]
    rounds = [{"round": 0},
              {"round": 1, "gates": {"candidates": candidates, "weights": [[0.5, 0.0, 0.5], [0.2, 0.2, 0.6]]}},
              {"round": 2, "gates": {"candidates": ["client-1", "keep"], "weights": [[0.5, 0.5]]}},
              {"round": 3, "gates": {"candidates": candidates, "weights": [[0.0, 1.0, 0.0]]}}]
    numbers, weights = weights_by_round(rounds, candidates)
    assert numbers == [1, 3]
    assert weights == [pytest.approx([0.35, 0.0]), pytest.approx([0.1, 1.0]), pytest.approx([0.55, 0.0])]
    path = tmp_path / "by_round.png"
    _plot_weights_by_round(numbers, weights, ["client-0 *", "client-1", "keep"], Cell("softmerge", "none", 0.5, 0),
                           path)
    assert path.is_file() and path.stat().st_size > 0
    # No round gated these candidates: nothing to draw (plot_cells then draws no figure).
    assert weights_by_round(rounds, ["client-7"]) == ([], [])


def test_every_defense_keeps_one_colour_of_its_own_in_every_accuracy_figure():
    from softmerge.simulations.config import STRATEGIES
    from softmerge.simulations.grid import ORACLE, curve_style

    styles = {name: curve_style(name) for name in (*STRATEGIES, ORACLE)}
    colours = [style["color"] for style in styles.values()]
    assert len(set(colours)) == len(colours)
    # The method under test is drawn widest and on top; only the oracle is dashed.
    assert all(styles["softmerge"]["linewidth"] > style["linewidth"] for name, style in styles.items()
               if name != "softmerge")
    assert styles["softmerge"]["zorder"] >= max(style["zorder"] for style in styles.values())
    assert [name for name, style in styles.items() if style["linestyle"] != "-"] == [ORACLE]


def test_plots_drop_the_heatmaps_of_a_softmerge_cell_that_is_no_longer_finished(tmp_path):
    from softmerge.simulations.grid import plot_cells

    plots = tmp_path / "plots"
    plots.mkdir()
    stale = [plots / "gates__alie__f0.2.png", plots / "gates_by_round__alie__f0.2.png"]
    for path in stale:
        path.write_bytes(b"an older configuration's figure")
    # Deleted to be rerun (no results.json), then half-way through its rerun ("running").
    plot_cells(tmp_path, [Cell("softmerge", "alie", 0.2, 0)], 10)
    assert not any(path.exists() for path in stale)
    cell = tmp_path / "cells" / "softmerge__alie__f0.2__s0"
    cell.mkdir(parents=True)
    gates = {"units": ["model"], "candidates": ["client-0", "keep"], "weights": [[0.5, 0.5]]}
    (cell / "results.json").write_text(json.dumps(
        {"status": "running", "rounds": [{"round": 1, "test_accuracy": 0.5, "gates": gates}]}))
    for path in stale:
        path.write_bytes(b"an older configuration's figure")
    plot_cells(tmp_path, [Cell("softmerge", "alie", 0.2, 0)], 10)
    assert not any(path.exists() for path in stale)
    (cell / "results.json").write_text(json.dumps(
        {"status": "finished", "rounds": [{"round": 1, "test_accuracy": 0.5, "gates": gates}]}))
    plot_cells(tmp_path, [Cell("softmerge", "alie", 0.2, 0)], 10)
    assert all(path.stat().st_size > 1000 for path in stale)


def test_plots_are_drawn_again_only_when_their_data_changed(tmp_path):
    from softmerge.simulations.grid import plot_cells

    cells = [Cell("softmerge", "alie", 0.2, 0), Cell("oracle", "none", 0.2, 0)]
    gates = {"units": ["model"], "candidates": ["client-0", "keep"], "weights": [[0.5, 0.5]]}

    def finish(key, accuracy):
        directory = tmp_path / "cells" / key
        directory.mkdir(parents=True, exist_ok=True)
        rounds = [{"round": 1, "test_accuracy": accuracy, "gates": gates}]
        (directory / "results.json").write_text(json.dumps({"status": "finished", "rounds": rounds}))

    finish("softmerge__alie__f0.2__s0", 0.5)
    finish("oracle__none__f0.2__s0", 0.6)
    plot_cells(tmp_path, cells, 10)
    plots = tmp_path / "plots"
    names = ["accuracy__alie__f0.2.png", "gates__alie__f0.2.png", "gates_by_round__alie__f0.2.png"]
    for name in names:
        (plots / name).write_bytes(b"kept")
    plot_cells(tmp_path, cells, 10)
    assert all((plots / name).read_bytes() == b"kept" for name in names)
    # The oracle's curve changed: only the accuracy figure shows it.
    finish("oracle__none__f0.2__s0", 0.7)
    plot_cells(tmp_path, cells, 10)
    assert (plots / names[0]).stat().st_size > 1000
    assert all((plots / name).read_bytes() == b"kept" for name in names[1:])
    # A figure deleted by hand is drawn again; a damaged manifest redraws everything.
    (plots / names[1]).unlink()
    plot_cells(tmp_path, cells, 10)
    assert (plots / names[1]).stat().st_size > 1000 and (plots / names[2]).read_bytes() == b"kept"
    (plots / "manifest.json").write_text("{not json")
    plot_cells(tmp_path, cells, 10)
    assert all((plots / name).stat().st_size > 1000 for name in names)
    # No finished cell left for a figure: it goes, rather than show data no longer on disk.
    for key in ("softmerge__alie__f0.2__s0", "oracle__none__f0.2__s0"):
        (tmp_path / "cells" / key / "results.json").unlink()
    plot_cells(tmp_path, cells, 10)
    assert not any((plots / name).exists() for name in names)


def test_settings_mismatch_names_what_changed_and_ignores_what_cannot_matter():
    from softmerge.simulations.grid import settings_mismatch

    expected = {"strategy": "fedavg", "learning-rate": 0.05, "softmerge-lr": 0.1, "output-dir": "here",
                "softmerge-keep-mode": "anchor", "trim-beta": 0.2, "new-key": 1}
    recorded = {"strategy": "fedavg", "learning-rate": 0.05, "softmerge-lr": 0.3, "output-dir": "elsewhere",
                "softmerge-keep-mode": "candidate", "trim-beta": 0.1}
    # FedAvg reads no softmerge-* or trim-beta key; where a cell ran is not what it computed;
    # a key the cell never recorded (added later) is not held against it.
    assert settings_mismatch(recorded, expected) == {}
    assert settings_mismatch({**recorded, "learning-rate": 0.1}, expected) == {"learning-rate": (0.1, 0.05)}
    softmerge = {**expected, "strategy": "softmerge"}
    assert settings_mismatch({**recorded, "strategy": "softmerge"}, softmerge) == {
        "softmerge-lr": (0.3, 0.1), "softmerge-keep-mode": ("candidate", "anchor")}
    # A cell from before a key existed ran with the key's legacy value, and is held to it.
    assert settings_mismatch(recorded, {**expected, "attack-claimed-examples": 0}) == {}
    assert settings_mismatch(recorded, {**expected, "attack-claimed-examples": 10**5}) == {
        "attack-claimed-examples": (0, 10**5)}
    assert settings_mismatch({**recorded, "strategy": "softmerge"}, {
        **softmerge, "softmerge-lr": 0.3, "softmerge-keep-mode": "candidate", "softmerge-example-weights": True}) == {
        "softmerge-example-weights": (False, True)}
    # SoftMerge cells from before the mirror rule for trusted clients ran without it (0).
    before = {**softmerge, "softmerge-lr": 0.3, "softmerge-keep-mode": "candidate"}
    assert settings_mismatch({**recorded, "strategy": "softmerge"}, {**before, "softmerge-mirror-trusted": 0.6}) == {
        "softmerge-mirror-trusted": (0.0, 0.6)}
    assert settings_mismatch({**recorded, "strategy": "softmerge"}, {**before, "softmerge-mirror-trusted": 0.0}) == {}
    # ... and scored each client at its own step: a grid of another warm-start step must run them again.
    assert settings_mismatch({**recorded, "strategy": "softmerge"}, {
        **before, "softmerge-mirror-trusted": 0.0, "softmerge-warm-step": "auto"}) == {
        "softmerge-warm-step": ("candidate", "auto")}
    assert settings_mismatch({**recorded, "strategy": "softmerge"}, {
        **before, "softmerge-mirror-trusted": 0.0, "softmerge-warm-step": "candidate"}) == {}


def _finished_cell(output, cell, settings):
    from softmerge.simulations.config import to_run_config
    from softmerge.simulations.grid import cell_settings

    recorded = to_run_config(cell_settings(settings, cell, 10, output))
    (output / "cells" / cell.key).mkdir(parents=True)
    rounds = [{"round": r, "test_accuracy": a} for r, a in enumerate([0.1, 0.6])]
    (output / "cells" / cell.key / "results.json").write_text(
        json.dumps({"status": "finished", "settings": recorded, "rounds": rounds}))


def test_grid_refuses_finished_cells_that_ran_with_other_settings(tmp_path, capsys):
    # The cell key names strategy, attack, fraction and seed only: a grid asked for another
    # learning rate must not pass the old cell off as its own, nor run beside it.
    from softmerge.simulations.config import parse_run_config

    old = parse_run_config({"dataset": "digits", "num-server-rounds": 1, "partitioning": "dirichlet",
                            "learning-rate": 0.05})
    _finished_cell(tmp_path, Cell("fedavg", "none", 0.2, 0), old)
    argv = ["--dataset", "digits", "--clients", "10", "--rounds", "1", "--strategies", "fedavg", "--attacks",
            "none", "--fractions", "0.2", "--no-oracle", "--output", str(tmp_path)]
    assert main(argv + ["--set", "learning-rate=0.2"]) == 2
    err = capsys.readouterr().err
    assert "fedavg__none__f0.2__s0: learning-rate: 0.05 there, 0.2 here" in err and "--output" in err
    assert not (tmp_path / "cells.json").exists() and not (tmp_path / "grid.json").exists()
    assert main(argv + ["--set", "learning-rate=0.2", "--tables-only"]) == 2
    # The same settings: the finished cell is reused, nothing runs, and grid.json lists the call once.
    assert main(argv + ["--set", "learning-rate=0.05"]) == 0
    assert main(argv + ["--set", "learning-rate=0.05"]) == 0
    record = json.loads((tmp_path / "grid.json").read_text())
    assert record["invocations"] == [argv + ["--set", "learning-rate=0.05"]]
    assert json.loads((tmp_path / "cells.json").read_text())[0]["final_accuracy"] == 0.6


def test_grid_record_keeps_every_distinct_invocation_and_reads_the_old_format(tmp_path):
    from softmerge.simulations.grid import record_invocation

    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"argv": ["--fractions", "0.4"], "base": {"dataset": "digits"}}))
    record_invocation(path, ["--fractions", "0.2"], {"dataset": "digits"})
    record_invocation(path, ["--fractions", "0.4"], {"dataset": "digits"})
    assert json.loads(path.read_text()) == {"base": {"dataset": "digits"},
                                            "invocations": [["--fractions", "0.4"], ["--fractions", "0.2"]]}


def test_grids_recording_their_invocations_at_once_lose_none(tmp_path):
    # Each process appends 40 command lines to one grid.json, read-modify-write each time. They
    # start together once all have imported, and each pauses between its read and its write,
    # so without the lock they would overwrite each other's lines in nearly every round.
    path, go = tmp_path / "grid.json", tmp_path / "go"
    script = ("import sys, time; from pathlib import Path; from softmerge.simulations import grid\n"
              "read = grid.read_json_object\n"
              "def slow_read(path):\n"
              "    value = read(path); time.sleep(0.005); return value\n"
              "grid.read_json_object = slow_read\n"
              "Path(sys.argv[3] + sys.argv[2]).touch()\n"
              "while not Path(sys.argv[3]).exists(): time.sleep(0.001)\n"
              "for i in range(40): grid.record_invocation(Path(sys.argv[1]), [sys.argv[2], str(i)], {})")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(path), name, str(go)]) for name in ("a", "b", "c")]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}{name}").exists() for name in "abc") and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    recorded = json.loads(path.read_text())["invocations"]
    assert sorted(map(tuple, recorded)) == sorted((name, str(i)) for name in "abc" for i in range(40))


def test_a_no_attack_run_is_reused_across_fractions_only_where_it_is_the_same_run(tmp_path, monkeypatch):
    # With no attack the "malicious" clients train honestly, so FedAvg's run does not depend on
    # the fraction; Krum is told f, and the oracle drops the malicious clients: theirs do.
    from softmerge.simulations import engine
    from softmerge.simulations.config import parse_run_config, to_run_config
    from softmerge.simulations.grid import cell_settings, finished_cell, no_attack_twin

    settings = parse_run_config({"dataset": "digits", "num-server-rounds": 1, "partitioning": "dirichlet"})
    _finished_cell(tmp_path, Cell("fedavg", "none", 0.2, 0), settings)
    _finished_cell(tmp_path, Cell("krum", "none", 0.2, 0), settings)

    def expected(cell, base=settings):
        return to_run_config(cell_settings(base, cell, 10, tmp_path))

    fedavg_40 = Cell("fedavg", "none", 0.4, 0)
    assert no_attack_twin(tmp_path, fedavg_40, expected(fedavg_40), 10)[0] == "fedavg__none__f0.2__s0"
    for other in (Cell("krum", "none", 0.4, 0), Cell("oracle", "none", 0.4, 0), Cell("fedavg", "sign-flip", 0.4, 0),
                  Cell("fedavg", "none", 0.4, 1)):
        assert no_attack_twin(tmp_path, other, expected(other), 10) is None, other
    changed = parse_run_config({"dataset": "digits", "num-server-rounds": 1, "partitioning": "dirichlet",
                                "learning-rate": 0.2})
    assert no_attack_twin(tmp_path, fedavg_40, expected(fedavg_40, changed), 10) is None

    def must_not_run(*args, **kwargs):
        raise AssertionError("a reusable cell was run")

    monkeypatch.setattr(engine, "run_experiment", must_not_run)
    argv = ["--dataset", "digits", "--clients", "10", "--rounds", "1", "--strategies", "fedavg", "--attacks", "none",
            "--fractions", "0.2,0.4,0.6", "--no-oracle", "--output", str(tmp_path)]
    assert main(argv) == 0
    copied = json.loads((tmp_path / "cells" / "fedavg__none__f0.6__s0" / "results.json").read_text())
    assert copied["reused_from"] == "fedavg__none__f0.2__s0" and copied["status"] == "finished"
    rows = {row["key"]: row for row in json.loads((tmp_path / "cells.json").read_text())}
    assert [rows[f"fedavg__none__f{f}__s0"]["final_accuracy"] for f in ("0.2", "0.4", "0.6")] == [0.6] * 3
    # The copies carry the 20% cell's malicious ids; the settings check knows that is the same run.
    assert main(argv) == 0

    # The source deleted to be run again: its copies go with it (the tables forget them), and
    # the next run copies the new results, never a copy of the old ones.
    source = tmp_path / "cells" / "fedavg__none__f0.2__s0" / "results.json"
    rerun = json.loads(source.read_text())
    source.unlink()
    assert finished_cell(tmp_path, fedavg_40) is None
    assert finished_cell(tmp_path, Cell("fedavg", "none", 0.6, 0)) is None
    rerun["rounds"][-1]["test_accuracy"] = 0.7
    source.write_text(json.dumps(rerun))
    assert main(argv) == 0
    rows = {row["key"]: row for row in json.loads((tmp_path / "cells.json").read_text())}
    assert [rows[f"fedavg__none__f{f}__s0"]["final_accuracy"] for f in ("0.2", "0.4", "0.6")] == [0.7] * 3


def test_cells_of_another_client_count_are_neither_reused_nor_mixed_in(tmp_path, capsys):
    from softmerge.simulations.config import parse_run_config, to_run_config
    from softmerge.simulations.grid import cell_settings, no_attack_twin, same_clients

    # Recorded nodes decide; without them (older runs), the malicious ids at the run's own
    # fraction must be this count's first round(f * n). An attack name may contain "__f".
    assert same_clients({"nodes": 20}, "fedavg__none__f0.2__s0", 20)
    assert not same_clients({"nodes": 10}, "fedavg__none__f0.2__s0", 20)
    legacy = {"settings": {"malicious-partitions": "0,1,2,3,4,5,6,7"}}
    assert same_clients(legacy, "fltrust__fang__f0.4__s0", 20)
    assert not same_clients(legacy, "fltrust__fang__f0.4__s0", 10)
    assert not same_clients({"settings": {}}, "fedavg__none__f0.2__s0", 20)

    settings = parse_run_config({"dataset": "digits", "num-server-rounds": 1, "partitioning": "dirichlet"})
    _finished_cell(tmp_path, Cell("fedavg", "none", 0.2, 0), settings)  # a 10-client run
    path = tmp_path / "cells" / "fedavg__none__f0.2__s0" / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "nodes": 10}))
    cell = Cell("fedavg", "none", 0.4, 0)
    expected = to_run_config(cell_settings(settings, cell, 10, tmp_path))
    assert no_attack_twin(tmp_path, cell, expected, 10)[0] == "fedavg__none__f0.2__s0"
    assert no_attack_twin(tmp_path, cell, expected, 20) is None
    # Its own cell in a 20-client grid: the settings alone would pass (the fraction keys of a
    # no-attack FedAvg run are ignored), the client count does not.
    argv = ["--dataset", "digits", "--clients", "20", "--rounds", "1", "--strategies", "fedavg", "--attacks",
            "none", "--fractions", "0.2", "--no-oracle", "--output", str(tmp_path), "--tables-only"]
    assert main(argv) == 2
    assert "fedavg__none__f0.2__s0: clients: 10 there, 20 here" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_cell_whose_checkpoint_cannot_be_resumed_starts_over(tmp_path, capsys):
    # A checkpoint of another run config (as after an upgrade that adds a run-config key)
    # makes the server refuse to resume; the grid owns the cell, so it starts it over.
    cell = tmp_path / "cells" / "fedavg__none__f0.5__s0"
    cell.mkdir(parents=True)
    (cell / "checkpoint.json").write_text(json.dumps({"format": 1, "config": "another run", "round": 1}))
    (cell / "checkpoint.npz").write_bytes(b"")
    (cell / "results.json").write_text(json.dumps({"status": "running", "rounds": []}))
    argv = ["--dataset", "digits", "--clients", "2", "--rounds", "1", "--strategies", "fedavg", "--attacks", "none",
            "--fractions", "0.5", "--no-oracle", "--output", str(tmp_path)]
    assert main(argv) == 0
    assert "starting over" in capsys.readouterr().out
    result = json.loads((cell / "results.json").read_text())
    assert result["status"] == "finished" and [r["round"] for r in result["rounds"]] == [0, 1]
    assert json.loads((cell / "checkpoint.json").read_text())["config"] != "another run"


def test_accuracy_plots_draw_every_seed_as_a_mean_and_a_band():
    from softmerge.simulations.grid import seed_band

    # Seed 1 stopped after round 2: the band covers the rounds every seed reached.
    numbers, mean, low, high, seeds = seed_band([{0: 0.1, 1: 0.5, 2: 0.7, 3: 0.8}, {0: 0.1, 1: 0.3, 2: 0.9}])
    assert numbers == [0, 1, 2] and seeds == 2
    assert mean == pytest.approx([0.1, 0.4, 0.8]) and low == [0.1, 0.3, 0.7] and high == [0.1, 0.5, 0.9]
    assert seed_band([{1: 0.5}]) == ([1], [0.5], [0.5], [0.5], 1)


def test_an_accuracy_plot_changes_when_a_later_seed_finishes(tmp_path):
    from softmerge.simulations.grid import plot_cells

    cells = [Cell("fedavg", "alie", 0.2, 0), Cell("fedavg", "alie", 0.2, 1)]

    def finish(key, accuracy):
        directory = tmp_path / "cells" / key
        directory.mkdir(parents=True, exist_ok=True)
        rounds = [{"round": 1, "test_accuracy": accuracy}, {"round": 2, "test_accuracy": accuracy}]
        (directory / "results.json").write_text(json.dumps({"status": "finished", "rounds": rounds}))

    finish("fedavg__alie__f0.2__s0", 0.5)
    plot_cells(tmp_path, cells, 10)
    figure = tmp_path / "plots" / "accuracy__alie__f0.2.png"
    figure.write_bytes(b"kept")
    plot_cells(tmp_path, cells, 10)
    assert figure.read_bytes() == b"kept"
    finish("fedavg__alie__f0.2__s1", 0.7)
    plot_cells(tmp_path, cells, 10)
    assert figure.stat().st_size > 1000


@pytest.mark.slow
def test_jobs_split_the_cells_over_workers_and_write_the_tables_from_all(tmp_path, capsys):
    argv = ["--dataset", "digits", "--clients", "4", "--rounds", "1", "--strategies", "softmerge,fedavg",
            "--attacks", "none,sign-flip", "--fractions", "0.25", "--no-oracle", "--output", str(tmp_path),
            "--jobs", "2"]
    assert main(argv) == 0
    rows = {row["key"]: row for row in json.loads((tmp_path / "cells.json").read_text())}
    assert len(rows) == 4 and all(row["status"] == "finished" for row in rows.values())
    logs = [(tmp_path / "workers" / f"{index}.log").read_text() for index in range(2)]
    # Every cell ran once: a worker either ran it, found it finished, or passed over it while the other ran it.
    assert not any(" failed: " in log for log in logs) and all("0 failed" in log for log in logs)
    assert (tmp_path / "plots" / "accuracy__sign-flip__f0.25.png").is_file()
    invocations = json.loads((tmp_path / "grid.json").read_text())["invocations"]
    assert invocations == [argv]
    assert main([*argv[:-2], "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_jobs_report_the_cells_their_workers_did_not_finish(tmp_path, capsys, monkeypatch):
    import softmerge.simulations.grid as grid

    # The tables pass after the workers runs nothing: its own count of failures is always 0,
    # so the grid's last word must come from the cells left unfinished.
    def one_worker_failed(argv, jobs, output, runnable):
        return 1, runnable[:1]

    monkeypatch.setattr(grid, "run_workers", one_worker_failed)
    argv = ["--dataset", "digits", "--clients", "4", "--rounds", "1", "--strategies", "fedavg",
            "--attacks", "none,sign-flip", "--fractions", "0.25", "--no-oracle", "--output", str(tmp_path),
            "--jobs", "2"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "none run here" in out and "0 failed" not in out
    assert ("1 of 2 runnable cells finished, 1 not (failed, stopped, or run by another grid): "
            "fedavg__none__f0.25__s0; 1 of 2 workers failed") in out
    monkeypatch.setattr(grid, "run_workers", lambda argv, jobs, output, runnable: (0, []))
    assert main(argv) == 0
    assert "2 of 2 runnable cells finished, 0 not" in capsys.readouterr().out


def test_a_rule_is_na_by_a_rounds_replies_not_the_client_count(capsys, tmp_path):
    # Krum needs n >= 2f + 3: 20 clients with f = 4 can run it, but not 10 replies a round.
    assert not_applicable(Cell("krum", "alie", 0.2, 0), 20) is None
    assert "2f + 3" in not_applicable(Cell("krum", "alie", 0.2, 0), 20, replies=10)
    argv = ["--dataset", "digits", "--clients", "20", "--rounds", "1", "--strategies", "krum", "--attacks", "alie",
            "--fractions", "0.2", "--no-oracle", "--plan", "--output", str(tmp_path), "--set", "fraction-train=0.5"]
    assert main(argv) == 0
    assert "krum__alie__f0.2__s0 Krum needs n >= 2f + 3 (n=10, f=4)" in capsys.readouterr().out


@pytest.mark.parametrize(("fraction", "clients"), [(0.45, 10), (0.04, 20), (0.25, 10)])
def test_a_fraction_that_is_not_a_whole_number_of_clients_is_refused(fraction, clients, capsys, tmp_path):
    # round() would run 4 attackers under a 45% label, none under an attack's name, 2 under 25%.
    argv = ["--dataset", "digits", "--clients", str(clients), "--rounds", "1", "--strategies", "fedavg",
            "--attacks", "sign-flip", "--fractions", str(fraction), "--plan", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "multiple of 1/" in capsys.readouterr().err
    assert main([*argv[:-5], "--fractions", "0.3", "--plan", "--output", str(tmp_path)]) == 0


def test_a_fraction_given_as_the_refusal_prints_it_is_taken(capsys, tmp_path):
    # 1/3 of 6 clients, written as the message's example writes it: 2 attackers.
    argv = ["--dataset", "digits", "--clients", "6", "--rounds", "1", "--strategies", "fedavg",
            "--attacks", "sign-flip", "--fractions", "0.3", "--plan", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "0.333333" in capsys.readouterr().err
    assert main([*argv[:-5], "--fractions", "0.333333", "--plan", "--output", str(tmp_path)]) == 0
    assert "sign-flip__f0.333333__s0" in capsys.readouterr().out


@pytest.mark.parametrize(("key", "option"), [("seed", "--seeds"), ("attack", "--attacks"),
                                             ("output-dir", "--output"), ("malicious-partitions", "--fractions"),
                                             ("dirichlet-alpha", "--alpha")])
def test_a_key_the_grid_sets_per_cell_is_refused_in_set(key, option, capsys, tmp_path):
    # The cell would overwrite it: --set seed=7 ran seed 0 without a word.
    argv = ["--dataset", "digits", "--clients", "4", "--rounds", "1", "--strategies", "fedavg", "--attacks", "none",
            "--fractions", "0.25", "--plan", "--output", str(tmp_path), "--set", f"{key}=1"]
    assert main(argv) == 2
    assert f"--set {key}: the grid sets it per cell; use {option}" in capsys.readouterr().err


def test_an_output_that_cannot_be_created_is_one_line_not_a_traceback(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    argv = ["--dataset", "digits", "--clients", "4", "--rounds", "1", "--strategies", "fedavg", "--attacks", "none",
            "--fractions", "0.25", "--output", str(blocker / "grid")]
    assert main(argv) == 2
    assert "softmerge-grid: cannot write to --output" in capsys.readouterr().err


def test_alpha_is_a_dimension_of_the_grid_that_keeps_the_default_alphas_cell_names(tmp_path):
    from softmerge.simulations.config import parse_run_config
    from softmerge.simulations.grid import _row_cell, cell_settings, key_fraction

    cells = plan_cells(["softmerge"], ["none", "fang"], [0.2, 0.4], [0], oracle=True, alphas=[0.1, 0.5])
    assert len(cells) == 2 * (2 + 2 * 2)
    keys = {cell.key for cell in cells}
    # The reference grid's cells (alpha 0.5) keep their names; another alpha is named.
    assert {"oracle__none__f0.2__s0", "softmerge__fang__f0.4__s0", "oracle__none__f0.2__s0__a0.1",
            "softmerge__fang__f0.4__s0__a0.1"} <= keys
    assert Cell("softmerge", "fang", 0.4, 0) == Cell("softmerge", "fang", 0.4, 0, 0.5)
    assert key_fraction("softmerge__fang__f0.4__s0__a0.1") == key_fraction("softmerge__fang__f0.4__s0") == 0.4
    with pytest.raises(ValueError):
        key_fraction("softmerge__fang")
    settings = parse_run_config({"dataset": "digits"})
    assert cell_settings(settings, Cell("fedavg", "none", 0.2, 0, 0.1), 10, tmp_path).dirichlet_alpha == 0.1
    assert cell_settings(settings, Cell("fedavg", "none", 0.2, 0), 10, tmp_path).dirichlet_alpha == 0.5
    row = summarise_cell(Cell("fedavg", "none", 0.2, 3, 0.1), None, 10, "finished", None)
    assert row["alpha"] == 0.1 and _row_cell(row) == Cell("fedavg", "none", 0.2, 3, 0.1)
    old_row = {key: value for key, value in summarise_cell(Cell("fedavg", "none", 0.2, 3), None, 10, "finished",
                                                           None).items() if key != "alpha"}
    assert _row_cell(old_row) == Cell("fedavg", "none", 0.2, 3)  # written before alpha was a column


@pytest.mark.parametrize("alpha", ["0", "-1", "x", "inf", ",", "0.1234567"])
def test_an_alpha_that_is_not_a_positive_number_is_refused(alpha, capsys, tmp_path):
    argv = ["--dataset", "digits", "--clients", "4", "--rounds", "1", "--strategies", "fedavg", "--attacks", "none",
            "--fractions", "0.25", "--plan", "--output", str(tmp_path), "--alpha", alpha]
    assert main(argv) == 2
    assert "--alpha:" in capsys.readouterr().err


@pytest.mark.slow
def test_a_grid_over_two_alphas_runs_each_partitioning_and_tables_them_apart(tmp_path):
    argv = ["--dataset", "digits", "--clients", "4", "--rounds", "1", "--strategies", "fedavg", "--attacks", "none",
            "--fractions", "0.25", "--output", str(tmp_path), "--alpha", "0.05,0.5"]
    assert main(argv) == 0
    rows = {row["key"]: row for row in json.loads((tmp_path / "cells.json").read_text())}
    assert set(rows) == {"fedavg__none__f0.25__s0", "fedavg__none__f0.25__s0__a0.05", "oracle__none__f0.25__s0",
                         "oracle__none__f0.25__s0__a0.05"}
    assert all(row["status"] == "finished" for row in rows.values())
    results = {key: json.loads((tmp_path / "cells" / key / "results.json").read_text()) for key in rows}
    assert results["fedavg__none__f0.25__s0__a0.05"]["settings"]["dirichlet-alpha"] == 0.05
    assert results["fedavg__none__f0.25__s0"]["settings"]["dirichlet-alpha"] == 0.5
    # Each alpha is its own partitioning of the clients' data, so its own run.
    assert results["fedavg__none__f0.25__s0__a0.05"]["rounds"] != results["fedavg__none__f0.25__s0"]["rounds"]
    tables = (tmp_path / "tables.md").read_text()
    # The default alpha's tables first, as a grid of that alpha alone writes them; the other's headings name it.
    default, other = tables.split("(alpha=0.05)")
    assert "(alpha=0.5)" in default and "alpha 0.05" not in default
    assert "### Final test accuracy (%), 25% malicious\n" in default
    assert "### Final test accuracy (%), 25% malicious, alpha 0.05\n" in other
    # Each set of tables shows its own alpha's runs.
    for text, key in ((default, "fedavg__none__f0.25__s0"), (other, "fedavg__none__f0.25__s0__a0.05")):
        final = format_percent(rows[key]["final_accuracy"])
        assert f"| fedavg | {final} | - |" in text  # no attacked cell: no worst case
    assert (tmp_path / "plots" / "accuracy__none__f0.25__a0.05.png").is_file()
    assert (tmp_path / "plots" / "accuracy__none__f0.25.png").is_file()
    # Alpha is a cell's, as the fraction is: not in the base every cell shares.
    assert "dirichlet-alpha" not in json.loads((tmp_path / "grid.json").read_text())["base"]
    stamp = (tmp_path / "cells" / "fedavg__none__f0.25__s0__a0.05" / "results.json").stat().st_mtime_ns
    # A later grid at one alpha on the same output runs nothing again and keeps the other's tables.
    assert main([*argv[:-2], "--alpha", "0.5"]) == 0
    assert (tmp_path / "cells" / "fedavg__none__f0.25__s0__a0.05" / "results.json").stat().st_mtime_ns == stamp
    assert "(alpha=0.05)" in (tmp_path / "tables.md").read_text()


@pytest.mark.parametrize("attack", ["none", "alie"])  # an attack name may start with "a", as a key's alpha does
def test_a_cell_made_at_another_alpha_before_alpha_was_in_its_key_is_refused_with_the_way_out(attack, tmp_path,
                                                                                              capsys):
    from dataclasses import replace

    from softmerge.simulations.config import parse_run_config, to_run_config
    from softmerge.simulations.grid import cell_settings

    # What the grid wrote at alpha 0.1 before alpha was a dimension: the key does not name it.
    cell = Cell("fedavg", attack, 0.2, 0)
    ran = replace(cell_settings(parse_run_config({"dataset": "digits", "num-server-rounds": 1,
                                                  "partitioning": "dirichlet"}), cell, 10, tmp_path),
                  dirichlet_alpha=0.1)
    (tmp_path / "cells" / cell.key).mkdir(parents=True)
    (tmp_path / "cells" / cell.key / "results.json").write_text(json.dumps(
        {"status": "finished", "settings": to_run_config(ran),
         "rounds": [{"round": r, "test_accuracy": a} for r, a in enumerate([0.1, 0.6])]}))
    old_row = {key: value for key, value in summarise_cell(cell, None, 10, "finished", 1.0).items() if key != "alpha"}
    (tmp_path / "cells.json").write_text(json.dumps([old_row]))
    argv = ["--dataset", "digits", "--clients", "10", "--rounds", "1", "--strategies", "fedavg", "--attacks",
            attack, "--fractions", "0.2", "--no-oracle", "--output", str(tmp_path), "--alpha", "0.1"]
    assert main(argv + ["--tables-only"]) == 2
    err = capsys.readouterr().err
    assert f"fedavg__{attack}__f0.2__s0: dirichlet-alpha: 0.1 there, 0.5 here" in err
    assert "rename its directory cells/<key> to cells/<key>__a<alpha>" in err
    (tmp_path / "cells" / cell.key).rename(tmp_path / "cells" / f"{cell.key}__a0.1")
    assert main(argv + ["--tables-only"]) == 0
    rows = json.loads((tmp_path / "cells.json").read_text())
    assert [(row["key"], row["alpha"], row["final_accuracy"]) for row in rows] == [
        (f"{cell.key}__a0.1", 0.1, 0.6)]
