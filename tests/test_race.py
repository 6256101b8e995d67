"""The racing rule (soce.race) on synthetic item-score matrices: subsets, bound, elimination, budget, determinism.

The stand-in for a benchmark is a fixed matrix of per-item 0/1 outcomes per point, built with common random
numbers (one latent difficulty per item, shared by every point), so that neighbouring points agree on most
items as real soups do. The end-to-end race on the real demo is in tests/test_race_demo.py.
"""

import math

import numpy as np
import pytest

from soce import method
from soce import race as R


def matrix(n_points=85, k=8, n=200, seed=0, spread=0.3):
    """(points, item ids, Y[p][c][i] outcomes, full-split overall per point) for a 4-expert grid."""
    rng = np.random.default_rng(seed)
    pts = method.weight_grid(4)[:n_points]
    skill = rng.uniform(0.1, 0.8, size=(4, k))
    cats = [f"c{j}" for j in range(k)]
    u = rng.uniform(size=(k, n))
    y = {}
    for p, w in enumerate(pts):
        w = np.array(w)
        q = w @ skill - spread * ((w - 0.25) ** 2).sum()
        out = (u + 0.03 * rng.normal(size=(k, n)) < q[:, None]).astype(float)
        y[p] = {c: {str(i): out[j, i] for i in range(n)} for j, c in enumerate(cats)}
    ids = {c: [str(i) for i in range(n)] for c in cats}
    full = np.array([np.mean([np.mean(list(y[p][c].values())) for c in cats]) for p in y])
    return pts, ids, y, full


class Oracle:
    """score_items backed by the matrix; records every request (point, items)."""

    def __init__(self, y):
        self.y, self.calls = y, []

    def __call__(self, p, items):
        self.calls.append((p, {c: list(v) for c, v in items.items()}))
        return {c: {i: self.y[p][c][i] for i in ids} for c, ids in items.items()}

    @property
    def items(self):
        return sum(len(v) for _, it in self.calls for v in it.values())


def test_schedule_is_nested_stratified_and_ends_on_the_whole_split():
    plan = R.schedule({"a": 200, "b": 50}, 0.05, 2.0)
    assert plan[0] == {"a": 10, "b": 3}
    assert plan[-1] == {"a": 200, "b": 50}
    assert all(all(p[c] <= q[c] for c in p) for p, q in zip(plan, plan[1:], strict=False))
    assert R.schedule({"a": 3}, 0.05, 2.0)[0] == {"a": 2}  # min_items
    assert R.schedule({"a": 1}, 0.05, 2.0) == [{"a": 1}]


def test_item_order_is_seeded_deterministic_and_a_permutation():
    ids = {"a": [str(i) for i in range(50)]}
    o1, o2, o3 = R.item_order(ids, 0), R.item_order(ids, 0), R.item_order(ids, 1)
    assert o1 == o2 and o1 != o3 and sorted(o1["a"]) == sorted(ids["a"])
    assert R.item_order({"a": list(reversed(ids["a"]))}, 0) == o1  # independent of the input order


def test_paired_bound_weights_categories_and_is_exact_on_the_whole_split():
    a = {"x": 0.5, "y": 0.5}
    d = {"x": np.array([1.0, 0.0, 0.0, 1.0]), "y": np.array([0.0, -1.0])}
    diff, se = R.paired_bound(d, a, {"x": 4, "y": 2})
    assert diff == pytest.approx(0.5 * 0.5 + 0.5 * -0.5)  # the mean of category means, not of items
    assert se == 0.0  # finite-population correction: every item seen
    diff, se = R.paired_bound(d, a, {"x": 100, "y": 100})
    assert se > 0
    _, se0 = R.paired_bound({"x": np.zeros(10)}, {"x": 1.0}, {"x": 100})
    assert se0 == pytest.approx(math.sqrt(0.9 * (1 / 10) / 10))  # variance floor 1/m: never "certain"


def test_race_finds_the_full_split_best_for_a_fraction_of_the_grid():
    pts, ids, y, full = matrix()
    oracle = Oracle(y)
    out = R.race(len(pts), ids, oracle, R.RaceSettings(budget=0.2 * len(pts)))
    assert out.best == int(np.argmax(full))
    assert out.scores["overall"] == pytest.approx(full.max())
    assert out.items_evaluated == oracle.items <= 0.2 * len(pts) * 1600
    assert out.full_split_equivalents == pytest.approx(out.items_evaluated / 1600)
    assert out.rounds[-1]["finals"] and out.rounds[0]["alive"] == len(pts)


def test_race_never_asks_twice_for_an_item_of_a_point():
    pts, ids, y, _ = matrix()
    oracle = Oracle(y)
    R.race(len(pts), ids, oracle, R.RaceSettings())
    seen = set()
    for p, items in oracle.calls:
        for c, v in items.items():
            for i in v:
                assert (p, c, i) not in seen
                seen.add((p, c, i))


def test_clearly_worse_points_are_dropped_early_and_the_best_never_is():
    pts, ids, y, full = matrix(spread=3.0)  # steep objective: far points are much worse
    out = R.race(len(pts), ids, Oracle(y), R.RaceSettings())
    best = int(np.argmax(full))
    assert out.points[best]["dropped_in_round"] is None
    dropped_early = [r for r in out.points if r["dropped_in_round"] in (1, 2)]
    assert len(dropped_early) > len(pts) // 3
    worst = int(np.argmin(full))
    assert out.points[worst]["dropped_in_round"] is not None and out.points[worst]["items"] < 400


def test_ties_keep_every_point_and_pick_the_first():
    ids = {"a": [str(i) for i in range(40)]}
    same = {p: {"a": {i: float(int(i) % 3 == 0) for i in ids["a"]}} for p in range(5)}
    out = R.race(5, ids, Oracle(same), R.RaceSettings(finalists=2))
    assert out.best == 0 and all(r["dropped_in_round"] is None for r in out.points)


def test_deterministic_for_a_seed_and_the_seed_changes_the_items():
    pts, ids, y, _ = matrix()
    a, b, c = Oracle(y), Oracle(y), Oracle(y)
    ra = R.race(len(pts), ids, a, R.RaceSettings(seed=3, budget=17))
    rb = R.race(len(pts), ids, b, R.RaceSettings(seed=3, budget=17))
    R.race(len(pts), ids, c, R.RaceSettings(seed=4, budget=17))
    assert a.calls == b.calls and ra.best == rb.best and ra.rounds == rb.rounds
    assert a.calls[0] != c.calls[0]


@pytest.mark.parametrize("budget", [6.0, 10.0, 17.0, 40.0])
def test_budget_is_never_exceeded(budget):
    pts, ids, y, _ = matrix()
    oracle = Oracle(y)
    out = R.race(len(pts), ids, oracle, R.RaceSettings(budget=budget))
    assert oracle.items <= budget * 1600
    assert out.items_evaluated == oracle.items


def test_budget_below_the_first_round_is_refused_in_one_line():
    pts, ids, y, _ = matrix()
    with pytest.raises(method.SelectionError, match=r"search.budget=4 .* below the race's minimum 5.2"):
        R.race(len(pts), ids, Oracle(y), R.RaceSettings(budget=4))


@pytest.mark.parametrize("kw, message", [({"delta": 0}, "race_delta"), ({"start": 0}, "race_start"),
                                          ({"growth": 1.0}, "race_growth"), ({"finalists": 0}, "race_finalists"),
                                          ({"budget": -1}, "search.budget")])
def test_bad_settings_are_one_clear_line(kw, message):
    with pytest.raises(method.SelectionError, match=message):
        R.RaceSettings(**kw).check()


def test_category_weights_define_the_objective():
    """Unequal category sizes: the full-split objective is the mean of category means (or sum_c a_c mean_c)."""
    ids = {"big": [str(i) for i in range(100)], "small": [str(i) for i in range(10)]}
    y = {0: {"big": {i: 1.0 for i in ids["big"]}, "small": {i: 0.0 for i in ids["small"]}},
         1: {"big": {i: 0.0 for i in ids["big"]}, "small": {i: 1.0 for i in ids["small"]}}}
    out = R.race(2, ids, Oracle(y), R.RaceSettings())
    assert out.scores["overall"] == pytest.approx(0.5)  # not the item mean (100/110 for point 0)
    out = R.race(2, ids, Oracle(y), R.RaceSettings(), {"big": 0.2, "small": 0.8})
    assert out.best == 1 and out.scores["overall"] == pytest.approx(0.8)
    with pytest.raises(method.SelectionError, match="no coefficient for category 'small'"):
        R.race(2, ids, Oracle(y), R.RaceSettings(), {"big": 1.0})


def test_one_point_is_one_full_evaluation():
    ids = {"a": [str(i) for i in range(20)]}
    oracle = Oracle({0: {"a": {i: 1.0 for i in ids["a"]}}})
    out = R.race(1, ids, oracle, R.RaceSettings())
    assert out.best == 0 and out.items_evaluated == 20 and len(oracle.calls) == 1


def test_a_missing_item_score_is_one_clear_error():
    ids = {"a": [str(i) for i in range(20)]}
    with pytest.raises(method.SelectionError, match="point 0: item evaluation returned no score"):
        R.race(4, ids, lambda p, items: {"a": {}}, R.RaceSettings())
