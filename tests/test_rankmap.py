"""Rank map: grid coordinates, partitions, and every kind of invalid map (no MPI)."""
import json

import pytest

from mpipar.errors import RankMapError
from mpipar.rankmap import Grid, RankMap, linear_partition, parse_balance

NAMES = [f"fc{i}" for i in range(1, 9)]


def test_grid_coords_round_trip_and_tp_fastest():
    g = Grid(pp=2, dp=2, tp=2)
    assert [g.coords(r) for r in range(4)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert all(g.rank_of(*g.coords(r)) == r for r in range(8))


def test_grid_parse():
    assert Grid.parse(None, 4) == Grid(pp=4)
    assert Grid.parse("pp=2,dp=2", 4) == Grid(2, 2, 1)
    with pytest.raises(RankMapError, match="needs pp\\*dp\\*tp = 2\\*2\\*1 = 4 ranks, but the job has 8"):
        Grid.parse("pp=2,dp=2", 8)
    with pytest.raises(RankMapError, match="write it as"):
        Grid.parse("pp=two", 2)


def test_explicit_layers_and_params_balance():
    assert parse_balance("3,3,1,1", NAMES, 4)[0] == ["fc1", "fc2", "fc3"]
    assert [len(s) for s in parse_balance("layers", NAMES, 4)] == [2, 2, 2, 2]
    stages = parse_balance("params", NAMES, 2, param_counts=[1, 1, 1, 1, 1, 1, 1, 10])
    assert stages[1] == ["fc8"]


def test_linear_partition_is_optimal_on_small_cases():
    assert linear_partition([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == [5, 2, 2]
    assert linear_partition([5, 5, 5, 5], 4) == [1, 1, 1, 1]


@pytest.mark.parametrize("spec, n, msg", [
    ("3,3,2", 3, "covers 8"),                      # ok sum but checked below
    ("3,3,1", 3, "leaves fc8 without a stage"),     # gap
    ("3,3,3", 3, "asks for 9 layers"),              # too many
    ("4,0,4", 3, "stage 1 has no layers"),          # empty stage
    ("4,4", 3, "has 2 stages but the grid has pp=3"),
    ("x,y", 2, "expected sizes like"),
])
def test_bad_balances(spec, n, msg):
    if spec == "3,3,2":
        assert len(parse_balance(spec, NAMES, n)) == 3
        return
    with pytest.raises(RankMapError, match=msg):
        parse_balance(spec, NAMES, n)


def test_more_stages_than_layers():
    with pytest.raises(RankMapError, match="9 pipeline stages but the model has only 8 layers"):
        parse_balance("layers", NAMES, 9)


@pytest.mark.parametrize("stages, msg", [
    ([["fc1", "fc2", "fc3", "fc4"], ["fc4", "fc5", "fc6", "fc7", "fc8"]], "in stage 0 and stage 1 \\(overlap\\)"),
    ([["fc1", "fc2", "fc3"], ["fc5", "fc6", "fc7", "fc8"]], "fc4 are in no stage \\(gap\\)"),
    ([["fc1", "fc2", "fc3", "fc4"], ["fc5", "fc6", "fc7", "fc9"]], "names layer 'fc9'"),
    ([["fc1", "fc2", "fc5", "fc6"], ["fc3", "fc4", "fc7", "fc8"]], "contiguous layers in model order"),
    ([["fc1", "fc2", "fc3", "fc4", "fc5", "fc6", "fc7", "fc8"], []], "stage 1 has no layers"),
])
def test_bad_json_maps(tmp_path, stages, msg):
    p = tmp_path / "map.json"
    p.write_text(json.dumps({"stages": stages}))
    with pytest.raises(RankMapError, match=msg):
        parse_balance(str(p), NAMES, 2)


def test_json_file_errors(tmp_path):
    with pytest.raises(RankMapError, match="does not exist"):
        parse_balance(str(tmp_path / "none.json"), NAMES, 2)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(RankMapError, match="not valid JSON"):
        parse_balance(str(tmp_path / "bad.json"), NAMES, 2)


def test_table_names_every_rank():
    rm = RankMap(Grid(pp=2, dp=2), parse_balance("4,4", NAMES, 2))
    text = rm.table(["a", "a", "b", "b"], [1000, 1000, 2_500_000, 2_500_000])
    lines = text.splitlines()
    assert len(lines) == 5 and "fc1..fc4" in lines[1] and "2.5 M" in lines[3] and lines[4].endswith("b")
