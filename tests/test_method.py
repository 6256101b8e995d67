"""Algorithm 1 on hand-made score tables: correlation, weak set, experts (ties, empty L), grid, search."""

import math

import numpy as np
import pandas as pd
import pytest

from soce import method


def table(rows: dict[str, list[float]], cats: list[str]) -> pd.DataFrame:
    return pd.DataFrame.from_dict(rows, orient="index", columns=cats)


@pytest.fixture
def population() -> pd.DataFrame:
    # a and b move together (one family), c moves against nothing in particular
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, size=30)
    other = rng.uniform(0.2, 0.6, size=30)
    return pd.DataFrame({"a": base, "b": base + 0.01 * rng.normal(size=30), "c": other})


def test_correlation_matches_numpy(population):
    corr = method.category_correlation(population)
    assert corr.loc["a", "b"] == pytest.approx(np.corrcoef(population["a"], population["b"])[0, 1])
    assert corr.loc["a", "a"] == pytest.approx(1.0)


def test_correlation_needs_three_models():
    with pytest.raises(method.SelectionError, match="at least 3"):
        method.category_correlation(table({"m1": [0.1, 0.2], "m2": [0.3, 0.1]}, ["a", "b"]))


def test_weak_set_takes_categories_with_one_weak_partner(population):
    corr = method.category_correlation(population)
    assert corr.loc["a", "b"] > 0.95 and abs(corr.loc["a", "c"]) < 0.5
    # every category has a weak partner: a-c, b-c, c-a
    assert method.weak_categories(corr, tau=0.5) == ["a", "b", "c"]
    # tau below every |rho|: nothing is weak
    assert method.weak_categories(corr, tau=0.0) == []


def test_weak_set_strong_family_only():
    corr = pd.DataFrame([[1, 0.97, 0.96], [0.97, 1, 0.98], [0.96, 0.98, 1]], index=list("xyz"), columns=list("xyz"))
    assert method.weak_categories(corr, 0.9) == []
    assert method.weak_categories(corr, 0.965) == ["x", "z"]  # only pairs below tau count


def test_constant_category_is_left_out_of_L():
    pop = table({"m1": [0.1, 0.5, 0.3], "m2": [0.2, 0.5, 0.1], "m3": [0.3, 0.5, 0.9]}, ["a", "flat", "c"])
    corr = method.category_correlation(pop)
    assert "flat" not in method.weak_categories(corr, 0.99)


def test_experts_per_category_and_distinct():
    cands = table({"m1": [0.9, 0.1, 0.5], "m2": [0.2, 0.8, 0.5], "m3": [0.3, 0.2, 0.7]}, ["a", "b", "c"])
    experts = method.select_experts(cands, ["a", "b", "c"])
    assert experts == {"a": "m1", "b": "m2", "c": "m3"}
    assert method.distinct_experts({"a": "m3", "b": "m1", "c": "m3"}, cands) == ["m1", "m3"]


def test_tie_break_overall_then_order():
    # m1 and m2 tie on 'a'; m2 has the higher overall -> m2 ("overall"), m1 ("first")
    cands = table({"m1": [0.5, 0.1], "m2": [0.5, 0.4], "m3": [0.5, 0.4]}, ["a", "b"])
    assert method.select_experts(cands, ["a"], "overall") == {"a": "m2"}  # m2 == m3 overall -> earlier
    assert method.select_experts(cands, ["a"], "first") == {"a": "m1"}
    with pytest.raises(method.SelectionError, match="tie_break"):
        method.select_experts(cands, ["a"], "random")


def test_empty_L_gives_single_best_overall_expert():
    cands = table({"m1": [0.5, 0.1], "m2": [0.4, 0.4]}, ["a", "b"])
    experts = method.select_experts(cands, [])
    assert experts == {"overall": "m2"}
    assert method.distinct_experts(experts, cands) == ["m2"]


def test_single_expert_when_one_model_wins_everything():
    cands = table({"m1": [0.9, 0.9], "m2": [0.4, 0.4]}, ["a", "b"])
    assert method.distinct_experts(method.select_experts(cands, ["a", "b"]), cands) == ["m1"]
    assert method.weight_grid(1) == [(1.0,)]


def test_max_experts_keeps_best_overall():
    cands = table({"m1": [0.9, 0.1, 0.1], "m2": [0.2, 0.8, 0.5], "m3": [0.3, 0.2, 0.7]}, ["a", "b", "c"])
    assert method.distinct_experts({"a": "m1", "b": "m2", "c": "m3"}, cands, max_experts=2) == ["m2", "m3"]


@pytest.mark.parametrize(("n", "count"), [(2, 9), (3, 37), (4, 85), (5, 126)])
def test_grid_counts_match_the_paper(n, count):
    grid = method.weight_grid(n)
    assert len(grid) == count  # 36/84 grid points + the uniform point; for 2 and 5 it is on the grid
    assert all(math.isclose(sum(p), 1.0) for p in grid)
    assert all(min(p) >= 0.1 - 1e-9 for p in grid)
    assert len(set(grid)) == len(grid)


def test_grid_three_experts_has_36_points_plus_uniform():
    grid = method.weight_grid(3, include_uniform=False)
    assert len(grid) == 36
    assert method.weight_grid(3)[-1] == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_grid_rejects_bad_input():
    with pytest.raises(method.SelectionError, match="divide 1"):
        method.weight_grid(3, step=0.3)
    with pytest.raises(method.SelectionError, match="cannot each get"):
        method.weight_grid(11)


def test_search_picks_best_overall_and_traces_every_point():
    target = {"m1": 0.7, "m2": 0.3}

    def evaluate(w):  # peak at the target weights
        d = sum(abs(w[k] - target[k]) for k in w)
        return {"a": 1 - d, "b": 0.5}

    res = method.search_weights(["m1", "m2"], method.weight_grid(2), evaluate)
    assert res.weights == pytest.approx(target)
    assert res.scores["overall"] == pytest.approx(0.75)
    assert len(res.trace) == 9 and {"w.m1", "w.m2", "a", "b", "overall"} <= set(res.trace.columns)


def test_clusters_follow_families():
    corr = pd.DataFrame(
        [[1, 0.9, 0.1, 0.0], [0.9, 1, 0.2, 0.1], [0.1, 0.2, 1, 0.8], [0.0, 0.1, 0.8, 1]],
        index=list("abcd"),
        columns=list("abcd"),
    )
    assert method.category_clusters(corr, 0.5) == [["a", "b"], ["c", "d"]]
    assert method.category_clusters(corr, 0.05) == [["a", "b", "c", "d"]]
    cands = table({"m1": [0.9, 0.8, 0.1, 0.1], "m2": [0.1, 0.1, 0.7, 0.9]}, list("abcd"))
    assert method.cluster_experts(cands, [["a", "b"], ["c", "d"]]) == {"a+b": "m1", "c+d": "m2"}


def test_optuna_search_is_seeded_and_finds_the_peak(tmp_path):
    def evaluate(w):
        return {"a": 1 - abs(w["m1"] - 0.7), "b": 1.0}

    r1 = method.optuna_points(["m1", "m2"], evaluate, n_trials=12, seed=3)
    r2 = method.optuna_points(["m1", "m2"], evaluate, n_trials=12, seed=3)
    assert r1.weights == r2.weights and len(r1.trace) == 12
    assert sum(r1.weights.values()) == pytest.approx(1.0)
    assert abs(r1.weights["m1"] - 0.7) < 0.15
    # resumable: a study in storage continues to the budget instead of starting over
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    calls = []

    def counting(w):
        calls.append(w)
        return evaluate(w)

    method.optuna_points(["m1", "m2"], counting, n_trials=5, seed=1, storage=storage)
    res = method.optuna_points(["m1", "m2"], counting, n_trials=8, seed=1, storage=storage)
    assert len(calls) == 8 and len(res.trace) == 8


def test_greedy_soup_keeps_only_improving_candidates():
    good = {"m1", "m3"}

    def evaluate(w):  # soups containing m2 are bad
        return {"a": 0.2 if "m2" in w else 0.5 + 0.1 * len(set(w) & good)}

    res = method.greedy_soup(["m1", "m2", "m3"], evaluate)
    assert res.weights == {"m1": 0.5, "m3": 0.5}
    assert list(res.trace["kept"]) == [True, False, True]
