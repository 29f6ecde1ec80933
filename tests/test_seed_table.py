"""benchmarks/seed_table.py: defenses compared on the seeds all of them have finished."""

import json

import pytest

SCRIPT_NAME = "seed_table"


@pytest.fixture
def seed_table(benchmark_script):
    return benchmark_script


def _cell(output, key, accuracies, status="finished", asr=None):
    rounds = [{"round": r, "test_accuracy": a, "backdoor_asr": asr} for r, a in enumerate(accuracies)]
    (output / "cells" / key).mkdir(parents=True)
    (output / "cells" / key / "results.json").write_text(json.dumps({"status": status, "rounds": rounds}))


def test_only_seeds_every_defense_and_the_oracle_finished_are_compared(tmp_path, seed_table):
    flat = lambda value: [0.1] + [value] * 12  # noqa: E731  (round 0, then 12 trained rounds)
    for seed, value in ((0, 0.84), (1, 0.80)):
        _cell(tmp_path, f"oracle__none__f0.4__s{seed}", flat(value))
        _cell(tmp_path, f"softmerge__sign-flip__f0.4__s{seed}", flat(value - 0.005))
    _cell(tmp_path, "fltrust__sign-flip__f0.4__s0", flat(0.79))
    _cell(tmp_path, "fltrust__sign-flip__f0.4__s1", flat(0.70), status="running")  # not finished: seed 1 dropped
    lines = seed_table.seed_table(tmp_path, 0.4, ["softmerge", "fltrust"], ["sign-flip", "alie"], [0, 1], 20)
    row = next(line for line in lines if line.startswith("| sign-flip |"))
    assert row.split(" | ")[1] == "0"  # complete seeds: only 0
    assert "83.5" in row and "79.0" in row and "80.0" not in row
    assert next(line for line in lines if line.startswith("| alie |")).split(" | ")[1] == "none"
    softmerge = next(line for line in lines if line.startswith("| softmerge |"))
    # alie has no seed every defense finished: the worst case is over sign-flip alone, and says so.
    partial = "; partial: 1 of the 2 attacks have no complete seed)"
    assert f"83.5 (1/1 within oracle - 1{partial}" in softmerge
    assert f"79.0 (0/1 within oracle - 1{partial}" in next(line for line in lines if line.startswith("| fltrust |"))


def test_two_complete_seeds_are_averaged_with_their_range(tmp_path, seed_table):
    flat = lambda value: [0.1] + [value] * 12  # noqa: E731
    for seed, value in ((0, 0.84), (1, 0.80)):
        _cell(tmp_path, f"oracle__none__f0.4__s{seed}", flat(value))
        _cell(tmp_path, f"softmerge__alie__f0.4__s{seed}", flat(value))
    lines = seed_table.seed_table(tmp_path, 0.4, ["softmerge"], ["alie"], [0, 1, 2], 20)
    row = next(line for line in lines if line.startswith("| alie |"))
    assert row.split(" | ")[1] == "0,1" and "82.0 (±4.0)" in row


def test_backdoor_success_is_tabled_for_attacks_with_a_trigger_only(tmp_path, seed_table):
    flat = lambda value: [0.1] + [value] * 12  # noqa: E731
    for seed in (0, 1):
        _cell(tmp_path, f"oracle__none__f0.4__s{seed}", flat(0.84))
        _cell(tmp_path, f"softmerge__backdoor__f0.4__s{seed}", flat(0.83), asr=(0.02, 0.06)[seed])
        _cell(tmp_path, f"fltrust__backdoor__f0.4__s{seed}", flat(0.80), asr=(0.90, 1.0)[seed])
        _cell(tmp_path, f"softmerge__alie__f0.4__s{seed}", flat(0.83))
        _cell(tmp_path, f"fltrust__alie__f0.4__s{seed}", flat(0.80))
    lines = seed_table.seed_table(tmp_path, 0.4, ["softmerge", "fltrust"], ["backdoor", "alie"], [0, 1], 20)
    start = lines.index("Backdoor success rate (%), final round, lower is better:")
    table = lines[start:]
    assert table[2] == "| attack | complete seeds | softmerge | fltrust |"
    assert table[4:] == ["| backdoor | 0,1 | 4.0 (±4.0) | 95.0 (±10.0) |"]
    assert not any(line.startswith("| alie |") for line in table)


def test_by_default_every_attack_of_the_grid_at_that_fraction_is_tabled(tmp_path, seed_table):
    rows = [{"strategy": strategy, "attack": attack, "fraction": fraction}
            for strategy, attack, fraction in (("oracle", "none", 0.4), ("softmerge", "alie", 0.4),
                                               ("fltrust", "none", 0.4), ("softmerge", "mimic-fixed", 0.4),
                                               ("fltrust", "alie", 0.4), ("softmerge", "fang", 0.2))]
    (tmp_path / "cells.json").write_text(json.dumps(rows))
    assert seed_table.attacks_in_grid(tmp_path, 0.4) == ["none", "alie", "mimic-fixed"]


def test_an_unreadable_cell_list_asks_for_the_attacks(tmp_path, seed_table):
    (tmp_path / "cells.json").write_text("{not json")
    with pytest.raises(SystemExit, match="pass --attacks"):
        seed_table.attacks_in_grid(tmp_path, 0.4)


def test_an_attack_the_grid_has_no_cell_of_is_refused_not_dropped(tmp_path, seed_table, capsys):
    flat = [0.1] + [0.8] * 12
    _cell(tmp_path, "oracle__none__f0.4__s0", flat)
    _cell(tmp_path, "softmerge__sign-flip__f0.4__s0", flat)
    argv = ["--output", str(tmp_path), "--fraction", "0.4", "--strategies", "softmerge", "--seeds", "0"]
    # Without cells.json the given names cannot be checked, and are taken as given.
    assert seed_table.main(argv + ["--attacks", "sign-flip"]) == 0
    (tmp_path / "cells.json").write_text(json.dumps([
        {"strategy": "softmerge", "attack": "sign-flip", "fraction": 0.4}]))
    capsys.readouterr()
    assert seed_table.main(argv + ["--attacks", "sign-flp"]) == 2
    assert "no cell of sign-flp at 40%" in capsys.readouterr().err
    assert seed_table.main(argv + ["--attacks", "sign-flip"]) == 0


def test_another_alpha_reads_its_own_cells_and_attacks(tmp_path, seed_table):
    flat = lambda value: [0.1] + [value] * 12  # noqa: E731
    _cell(tmp_path, "oracle__none__f0.4__s0", flat(0.84))
    _cell(tmp_path, "softmerge__sign-flip__f0.4__s0", flat(0.83))
    _cell(tmp_path, "oracle__none__f0.4__s0__a0.1", flat(0.70))
    _cell(tmp_path, "softmerge__alie__f0.4__s0__a0.1", flat(0.65))
    (tmp_path / "cells.json").write_text(json.dumps([
        {"strategy": "softmerge", "attack": "sign-flip", "fraction": 0.4},  # a row from before alpha was a column
        {"strategy": "softmerge", "attack": "alie", "fraction": 0.4, "alpha": 0.1}]))
    assert seed_table.attacks_in_grid(tmp_path, 0.4) == ["sign-flip"]
    assert seed_table.attacks_in_grid(tmp_path, 0.4, 0.1) == ["alie"]
    lines = seed_table.seed_table(tmp_path, 0.4, ["softmerge"], ["alie"], [0], 20, alpha=0.1)
    row = next(line for line in lines if line.startswith("| alie |"))
    assert "70.0" in row and "65.0" in row and "84.0" not in row
