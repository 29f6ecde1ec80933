"""benchmarks/compare_grids.py: a variant grid's cells against the same cells of its base grid."""

import json

import pytest

SCRIPT_NAME = "compare_grids"


@pytest.fixture
def compare(benchmark_script):
    return benchmark_script


def _cell(output, key, accuracies, settings=None, merge_steps=None, asr=None, status="finished"):
    rounds = [{"round": r, "test_accuracy": a, "backdoor_asr": asr} for r, a in enumerate(accuracies)]
    if merge_steps is not None:
        for entry, flag in zip(rounds[1:], merge_steps):
            entry["gates"] = {"units": ["model"], "candidates": [], "weights": [[]], "merge_step": flag}
    (output / "cells" / key).mkdir(parents=True)
    (output / "cells" / key / "results.json").write_text(
        json.dumps({"status": status, "settings": settings or {}, "rounds": rounds}))
    parts = key.split("__")
    row = {"key": key, "strategy": parts[0], "attack": parts[1], "fraction": float(parts[2][1:]),
           "seed": int(parts[3][1:]), "alpha": 0.5, "status": status}
    table = output / "cells.json"
    rows = json.loads(table.read_text()) if table.exists() else []
    table.write_text(json.dumps([*rows, row]))


def _flat(value, rounds=12):
    return [0.1] + [value] * rounds


def _grids(tmp_path):
    base, variant = tmp_path / "base", tmp_path / "variant"
    softmerge = {"strategy": "softmerge", "learning-rate": 0.05}
    _cell(base, "oracle__none__f0.4__s0", _flat(0.84))
    _cell(base, "oracle__none__f0.4__s1", _flat(0.80))
    _cell(base, "softmerge__sign-flip__f0.4__s0", _flat(0.846), softmerge)
    _cell(base, "softmerge__sign-flip__f0.4__s1", _flat(0.78), softmerge)
    _cell(base, "softmerge__backdoor__f0.4__s0", _flat(0.85), softmerge, asr=0.04)
    changed = {**softmerge, "softmerge-warm-step": "auto"}
    _cell(variant, "softmerge__sign-flip__f0.4__s0", _flat(0.834), changed, merge_steps=[True] * 3 + [False] * 9)
    _cell(variant, "softmerge__sign-flip__f0.4__s1", _flat(0.80), changed, merge_steps=[False] * 12)
    _cell(variant, "softmerge__backdoor__f0.4__s0", _flat(0.82), changed, merge_steps=[True] * 12, asr=0.9)
    # A no-attack cell is the same run at every fraction, so the variant's may be another
    # fraction's run, reused: the malicious ids it records are not a difference.
    _cell(base, "softmerge__none__f0.4__s0", _flat(0.85), {**softmerge, "malicious-partitions": "0,1"})
    _cell(variant, "softmerge__none__f0.4__s0", _flat(0.85), {**changed, "malicious-partitions": "0,1,2"},
          merge_steps=[False] * 12)
    # Not in the base grid: nothing to compare it with.
    _cell(variant, "softmerge__alie__f0.4__s0", _flat(0.83), changed, merge_steps=[False] * 12)
    # Not finished in the variant: left out.
    _cell(variant, "softmerge__fang__f0.4__s0", _flat(0.5), changed, status="running")
    _cell(base, "softmerge__fang__f0.4__s0", _flat(0.85), softmerge)
    return base, variant


def test_cells_finished_in_both_grids_are_paired_with_their_oracle_and_merge_step_rounds(tmp_path, compare):
    base, variant = _grids(tmp_path)
    pairs = compare.paired_cells(base, variant, 20)
    assert sorted(pair["cell"].key for pair in pairs) == [
        "softmerge__backdoor__f0.4__s0", "softmerge__none__f0.4__s0", "softmerge__sign-flip__f0.4__s0",
        "softmerge__sign-flip__f0.4__s1"]
    by_key = {pair["cell"].key: pair for pair in pairs}
    flip = by_key["softmerge__sign-flip__f0.4__s0"]
    assert flip["variant_merge_steps"] == {"merge_step": 3, "own_step_retry": 0, "open_share": 0}
    assert flip["base_merge_steps"] is None  # the base never recorded it
    assert flip["oracle"]["final_accuracy"] == pytest.approx(0.84)
    # The base cell never recorded the key: it ran with the legacy value, its own step.
    assert flip["settings"] == {"softmerge-warm-step": ("candidate", "auto")}
    assert by_key["softmerge__none__f0.4__s0"]["settings"] == {"softmerge-warm-step": ("candidate", "auto")}


def test_the_table_shows_each_difference_and_each_grid_s_worst_case(tmp_path, compare):
    base, variant = _grids(tmp_path)
    lines = compare.comparison(compare.paired_cells(base, variant, 20))
    assert lines[0] == ("Settings that differ between the paired cells (base -> variant): "
                        "`softmerge-warm-step` 'candidate' -> 'auto'.")
    row = next(line for line in lines if line.startswith("| softmerge | sign-flip | 0 |"))
    # The test cells' gates name no candidate: nobody opened, no malicious weight; the base
    # recorded no gates at all.
    assert row.split(" | ")[3:] == ["84.0 / 84.0", "84.6 / 84.6", "83.4 / 83.4", "-1.2", "-1.2", "- / 3",
                                    "- / 0.0", "- / 0 |"]
    backdoor = next(line for line in lines if line.startswith("| softmerge | backdoor | 0 |"))
    assert "85.0 / 85.0 (4.0%)" in backdoor and "82.0 / 82.0 (90.0%)" in backdoor
    summary = next(line for line in lines if line.startswith("| softmerge | 4 |"))
    # Mean difference over the four cells: (-1.2 + 2.0 - 3.0 + 0.0) / 4.
    assert summary.split(" | ")[2] == "-0.6"
    # Worst case per grid: the lowest of the seed means per attack (sign-flip: 81.3 base,
    # 81.7 variant; oracle 82.0), with the attacks within a point of their oracle's seed
    # mean: the variant's backdoor cell (82.0 against 84.0) is not.
    # Sign-flip stands on two seeds, the backdoor on one: the worst case says so.
    assert summary.split(" | ")[4] == "final 81.3 (2/2) [1-2 seeds], last 10 81.3 (2/2) [1-2 seeds]"
    assert summary.split(" | ")[5] == "final 81.7 (1/2) [1-2 seeds], last 10 81.7 (1/2) [1-2 seeds] |"


def test_each_pair_shows_where_the_merged_weight_went(tmp_path, compare):
    base, variant = tmp_path / "base", tmp_path / "variant"
    softmerge = {"strategy": "softmerge"}
    _cell(base, "softmerge__sign-flip__f0.4__s0", _flat(0.84, 2), softmerge)
    _cell(variant, "softmerge__sign-flip__f0.4__s0", _flat(0.84, 2), softmerge)
    # Five clients at 40%: clients 0 and 1 attack, 2-4 are honest (4 never got through).
    candidates = ["client-0", "client-2", "client-3", "keep"]
    rounds = {base: [[[0.1, 0.9, 0.0, 0.0]], [[0.0, 0.5, 0.5, 0.0]]],
              variant: [[[0.0, 0.0, 0.0, 1.0]], [[0.0, 0.0, 1.0, 0.0]]]}
    for grid, weights in rounds.items():
        path = grid / "cells" / "softmerge__sign-flip__f0.4__s0" / "results.json"
        result = json.loads(path.read_text())
        for entry, unit_weights in zip(result["rounds"][1:], weights):
            entry["gates"] = {"units": ["model"], "candidates": candidates, "weights": unit_weights}
        path.write_text(json.dumps(result))
    (pair,) = compare.paired_cells(base, variant, 5)
    assert pair["base_honest_open"] == pytest.approx(0.5)  # one of three, then two of three
    assert pair["variant_honest_open"] == pytest.approx(1 / 6)  # the keep model is not a client
    assert pair["base"]["malicious_weight"] == pytest.approx(0.05)
    row = next(line for line in compare.comparison([pair]) if line.startswith("| softmerge | sign-flip |"))
    assert row.endswith("| 5.0 / 0.0 | 50 / 17 |")
    # With no attack nobody is malicious: no malicious weight, every client counted as honest.
    for grid in (base, variant):
        source, target = (grid / "cells" / f"softmerge__{attack}__f0.4__s0" for attack in ("sign-flip", "none"))
        target.mkdir()
        (target / "results.json").write_text((source / "results.json").read_text())
        rows = json.loads((grid / "cells.json").read_text())
        (grid / "cells.json").write_text(json.dumps([*rows, {**rows[0], "key": "softmerge__none__f0.4__s0",
                                                             "attack": "none"}]))
    none = next(pair for pair in compare.paired_cells(base, variant, 5) if pair["cell"].attack == "none")
    assert none["base_honest_open"] == pytest.approx((2 / 5 + 2 / 5) / 2)  # client-0 counts now
    row = next(line for line in compare.comparison([none]) if line.startswith("| softmerge | none |"))
    assert row.endswith("| - | 40 / 10 |")


def test_settings_differences_are_found_either_way_round(compare):
    from softmerge.simulations.grid import Cell

    cell = Cell("softmerge", "sign-flip", 0.4, 0)
    base = {"strategy": "softmerge", "softmerge-mirror-trusted": 0.6, "softmerge-beat-constant": True,
            "output-dir": "here", "malicious-partitions": "0,1"}
    variant = {"strategy": "softmerge", "softmerge-warm-step": "auto", "output-dir": "there",
               "malicious-partitions": "0,1"}
    # The variant's cell never recorded mirror-trusted: it ran with the legacy 0.0. The base's
    # never recorded the warm-start step: its own. Beat-constant has no legacy value to go by.
    # Where a cell ran is not a setting.
    assert compare.settings_difference(base, variant, cell) == {
        "softmerge-mirror-trusted": (0.6, 0.0), "softmerge-warm-step": ("candidate", "auto"),
        "softmerge-beat-constant": (True, compare.ONE_SIDE)}
    lines = compare.comparison([{"cell": cell, "settings": compare.settings_difference(base, variant, cell),
                                 "base": {"final_accuracy": 0.8, "last10_accuracy": 0.8},
                                 "variant": {"final_accuracy": 0.8, "last10_accuracy": 0.8},
                                 "base_merge_steps": None,
                                 "variant_merge_steps": {"merge_step": 0, "own_step_retry": 0, "open_share": 0},
                                 "oracle": None}])
    assert lines[:2] == [
        "Settings that differ between the paired cells (base -> variant): `softmerge-mirror-trusted` 0.6 -> 0.0; "
        "`softmerge-warm-step` 'candidate' -> 'auto'.",
        "Recorded by one grid's cells only (what the others ran with is not recorded): "
        "`softmerge-beat-constant` (base)."]


def test_differences_round_half_up_as_the_accuracies_do(compare):
    # 0.05 points is a binary float a little under or over; the tables' rounding goes up.
    assert compare._points(0.8460 - 0.8455) == "+0.1"
    assert compare._points(0.8280 - 0.8455) == "-1.8"
    assert compare._points(0.0004) == "0.0" and compare._points(-0.0004) == "0.0"
    assert compare._points(None) == "-"


def test_grids_without_a_shared_cell_say_so(tmp_path, compare):
    base, variant = tmp_path / "base", tmp_path / "variant"
    _cell(base, "softmerge__alie__f0.4__s0", _flat(0.84))
    _cell(variant, "softmerge__fang__f0.4__s0", _flat(0.84))
    assert compare.comparison(compare.paired_cells(base, variant, 20)) == ["No cell is finished in both grids."]


def test_a_grid_without_cells_json_is_a_clear_error(tmp_path, compare, capsys):
    (tmp_path / "base").mkdir()
    assert compare.main(["--base", str(tmp_path / "base"), "--variant", str(tmp_path / "base")]) == 2
    assert "has no cells.json" in capsys.readouterr().err


def test_the_merge_step_column_counts_the_rounds_learned_again(tmp_path, compare):
    base, variant = tmp_path / "base", tmp_path / "variant"
    softmerge = {"strategy": "softmerge"}
    _cell(base, "softmerge__gaussian__f0.8__s0", _flat(0.80, 4), softmerge, merge_steps=[True] * 4)
    _cell(variant, "softmerge__gaussian__f0.8__s0", _flat(0.82, 4), softmerge, merge_steps=[True, True, True, False])
    path = variant / "cells" / "softmerge__gaussian__f0.8__s0" / "results.json"
    result = json.loads(path.read_text())
    # Round 1 learned again from the own step, rounds 2 and 3 scored again at the open share.
    result["rounds"][1]["gates"]["own_step_retry"] = True
    for entry in result["rounds"][2:4]:
        entry["gates"]["open_share"] = 5
    result["rounds"][4]["gates"]["open_share"] = None
    path.write_text(json.dumps(result))
    (pair,) = compare.paired_cells(base, variant, 20)
    assert pair["variant_merge_steps"] == {"merge_step": 3, "own_step_retry": 1, "open_share": 2}
    row = next(line for line in compare.comparison([pair]) if line.startswith("| softmerge | gaussian |"))
    assert "| 4 / 3 (1 own-step retry, 2 at the open share) |" in row
