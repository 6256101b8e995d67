"""soce.benchmarks.holdout: carved selection/report items are disjoint, deterministic and stratified."""

import random

import pytest

from soce.benchmarks.holdout import carve, side


def ids(n: int, prefix: str = "") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_disjoint_complete_and_stratified():
    items = {"a": ids(200), "b": ids(51, "x"), "c": ids(2)}
    select, report = carve(items, 0.5, seed=0)
    for cat, all_ids in items.items():
        assert set(select[cat]).isdisjoint(report[cat])
        assert sorted(select[cat] + report[cat]) == sorted(all_ids)
        assert select[cat] and report[cat]  # every category on both sides (stratified)
    assert len(select["a"]) == 100 and len(select["b"]) == 26 and len(select["c"]) == 1


def test_deterministic_order_free_and_seeded():
    items = {"a": ids(100)}
    shuffled = {"a": random.Random(1).sample(items["a"], 100)}
    assert set(carve(items, 0.3, 7)[0]["a"]) == set(carve(shuffled, 0.3, 7)[0]["a"])
    assert carve(items, 0.3, 7) == carve(items, 0.3, 7)
    assert set(carve(items, 0.3, 7)[0]["a"]) != set(carve(items, 0.3, 8)[0]["a"])


def test_items_keep_their_side_when_items_are_added():
    before = carve({"a": ids(100)}, 0.5, 0)[0]["a"]
    after = carve({"a": ids(101)}, 0.5, 0)[0]["a"]
    assert len(set(before) & set(after)) >= 49  # the new item displaces at most one


def test_bad_input():
    with pytest.raises(ValueError, match="select_fraction"):
        carve({"a": ids(4)}, 1.0)
    with pytest.raises(ValueError, match="duplicate"):
        carve({"a": ["1", "1"]}, 0.5)
    assert side("select", "report", "report") == 1
    with pytest.raises(ValueError, match="neither"):
        side("select", "report", "dev")
