"""soce.report.analyses: Shapley values, consistency, emergent solves (model-free, fast)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from soce.report.analyses import consistency, emergent_by_category, emergent_solves, shapley_values

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CountingGame:
    """Wraps a game v(S) and counts the calls per coalition."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: Counter[frozenset[str]] = Counter()

    def __call__(self, s: frozenset[str]) -> float:
        self.calls[s] += 1
        return self.fn(s)


def additive(weights: dict[str, float]):
    return lambda s: sum(weights[p] for p in s)


def interaction_game(s: frozenset[str]) -> float:
    """5 players: additive part + a pairwise synergy (a, b) + a 3-way bonus (c, d, e) + a redundancy (a, c)."""
    w = {"a": 0.3, "b": 0.1, "c": 0.25, "d": -0.05, "e": 0.15}
    v = sum(w[p] for p in s)
    v += 0.2 * ({"a", "b"} <= s) + 0.3 * ({"c", "d", "e"} <= s) - 0.15 * ({"a", "c"} <= s)
    return v


def glove(s: frozenset[str]) -> float:
    """One left glove (L) and two right gloves (R1, R2): v(S) = number of pairs in S."""
    return float(min(sum(p.startswith("L") for p in s), sum(p.startswith("R") for p in s)))


# ------------------------------------------------------------------------------------------- Shapley


def test_additive_game_exact_values_are_the_weights():
    w = {"a": 1.5, "b": -0.25, "c": 3.0, "d": 0.0}
    res = shapley_values(list(w), additive(w))
    assert res.method == "exact" and res.stderr is None
    for p, wp in w.items():
        assert res.values[p] == pytest.approx(wp, abs=1e-12)


def test_glove_game_hand_computed():
    # L is pivotal in the 4 of 6 orderings where it is not first: 2/3; R1, R2 share the rest: 1/6 each.
    res = shapley_values(["L", "R1", "R2"], glove)
    assert res.values["L"] == pytest.approx(2 / 3, abs=1e-12)
    assert res.values["R1"] == pytest.approx(1 / 6, abs=1e-12)
    assert res.values["R2"] == pytest.approx(1 / 6, abs=1e-12)


def test_three_player_hand_example_with_nonzero_empty_value():
    # base model scores 50; a alone 60, b alone 55, c alone 50, ab 70, ac 58, bc 56, abc 72.
    table = {"": 50, "a": 60, "b": 55, "c": 50, "ab": 70, "ac": 58, "bc": 56, "abc": 72}
    game = CountingGame(lambda s: table["".join(sorted(s))])
    res = shapley_values(["a", "b", "c"], game, empty_value=50.0)
    # phi_a = 1/3 (60-50) + 1/6 (70-55) + 1/6 (58-50) + 1/3 (72-56) = 10/3 + 15/6 + 8/6 + 16/3 = 12.5
    # phi_b = 1/3 (55-50) + 1/6 (70-60) + 1/6 (56-50) + 1/3 (72-58) = 5/3 + 10/6 + 6/6 + 14/3 = 9.0
    # phi_c = 22 - 12.5 - 9 = 0.5  (check: 1/3*0 + 1/6*(-2) + 1/6*1 + 1/3*2 = 0.5)
    assert res.values == pytest.approx({"a": 12.5, "b": 9.0, "c": 0.5}, abs=1e-12)
    assert frozenset() not in game.calls  # v(empty) is the given number, never evaluated
    assert res.empty_value == 50.0 and res.grand_value == 72.0


@pytest.mark.parametrize("exact_max, antithetic", [(8, True), (0, True), (0, False)])
def test_efficiency_exact_and_sampled(exact_max, antithetic):
    game = CountingGame(interaction_game)
    players = ["a", "b", "c", "d", "e"]
    res = shapley_values(players, game, empty_value=0.1, exact_max=exact_max, n_permutations=31, antithetic=antithetic)
    assert res.method == ("exact" if exact_max else "sampled")
    total = interaction_game(frozenset(players)) - 0.1
    assert math.fsum(res.values.values()) == pytest.approx(total, abs=1e-9)


def test_efficiency_sampled_many_players():
    rng = np.random.default_rng(3)
    w = {f"p{i}": float(x) for i, x in enumerate(rng.normal(size=12))}

    def game(s):
        return sum(w[p] for p in s) + 0.5 * len(s) ** 0.5

    res = shapley_values(list(w), game, n_permutations=20, seed=1)
    assert res.method == "sampled" and res.n_permutations == 20
    assert math.fsum(res.values.values()) == pytest.approx(game(frozenset(w)), abs=1e-9)


@pytest.mark.parametrize("exact_max", [8, 0])
def test_symmetry_identical_players(exact_max):
    # x and y are interchangeable (same weight, same synergy with z)
    def game(s):
        return (
            0.4 * ("x" in s) + 0.4 * ("y" in s) + 0.2 * ("z" in s) + 0.3 * ({"x", "z"} <= s) + 0.3 * ({"y", "z"} <= s)
        )

    res = shapley_values(["x", "y", "z"], game, exact_max=exact_max, n_permutations=400)
    tol = 1e-12 if exact_max else 0.05
    assert res.values["x"] == pytest.approx(res.values["y"], abs=tol)


@pytest.mark.parametrize("exact_max", [8, 0])
def test_dummy_player_gets_zero(exact_max):
    def game(s):
        return interaction_game(s - {"dummy"})

    res = shapley_values(["a", "b", "c", "d", "e", "dummy"], game, exact_max=exact_max, n_permutations=50)
    # up to rounding: the game sums floats in a frozenset's (arbitrary) iteration order
    assert res.values["dummy"] == pytest.approx(0.0, abs=1e-12)
    if res.stderr is not None:
        assert res.stderr["dummy"] == pytest.approx(0.0, abs=1e-12)


def test_exact_and_sampled_agree():
    """Tolerance: |sampled - exact| <= 0.02 (values are O(0.1-0.5)) and within 4 standard errors + 1e-9."""
    players = ["a", "b", "c", "d", "e"]
    exact = shapley_values(players, interaction_game)
    sampled = shapley_values(players, interaction_game, exact_max=0, n_permutations=600, seed=7)
    assert sampled.method == "sampled" and sampled.stderr is not None
    for p in players:
        diff = abs(sampled.values[p] - exact.values[p])
        assert diff <= 0.02, (p, diff)
        assert diff <= 4 * sampled.stderr[p] + 1e-9, (p, diff, sampled.stderr[p])


def test_sampling_is_seeded():
    players = ["a", "b", "c", "d", "e"]
    r1 = shapley_values(players, interaction_game, exact_max=0, n_permutations=10, seed=5)
    r2 = shapley_values(players, interaction_game, exact_max=0, n_permutations=10, seed=5)
    assert r1.values == r2.values


def test_memoisation_exact_counts_each_coalition_once():
    game = CountingGame(interaction_game)
    res = shapley_values(["a", "b", "c", "d", "e"], game)
    assert res.evaluations == 2**5 - 1 == len(game.calls)
    assert max(game.calls.values()) == 1


def test_memoisation_sampled_counts_distinct_coalitions():
    game = CountingGame(glove)
    res = shapley_values(["L", "R1", "R2"], game, exact_max=0, n_permutations=200)
    # 200 orderings of 3 players touch only the 7 non-empty coalitions, each evaluated once
    assert res.evaluations == len(game.calls) == 7
    assert max(game.calls.values()) == 1
    assert res.n_permutations == 200


def test_max_evaluations_stops_sampling_early():
    players = [f"p{i}" for i in range(10)]
    game = CountingGame(lambda s: float(len(s)) ** 1.5)
    res = shapley_values(players, game, n_permutations=1000, max_evaluations=40, antithetic=False)
    assert res.n_permutations < 1000
    assert res.evaluations == len(game.calls) < 40 + len(players)
    assert math.fsum(res.values.values()) == pytest.approx(game.fn(frozenset(players)), abs=1e-9)


def test_shapley_edge_cases():
    assert shapley_values([], lambda s: 1.0).values == {}
    with pytest.raises(ValueError, match="distinct"):
        shapley_values(["a", "a"], lambda s: 1.0)
    df = shapley_values(["L", "R1", "R2"], glove).to_frame()
    assert list(df.index)[0] == "L" and list(df.columns) == ["shapley", "stderr"]


# --------------------------------------------------------------------------------------- consistency


def _populations(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Candidates: independent category scores. Soups: one shared latent quality + a little noise."""
    rng = np.random.default_rng(seed)
    cats = ["math", "code", "tools", "multilingual", "reasoning"]
    cand = pd.DataFrame(rng.uniform(30, 70, size=(8, len(cats))), columns=cats, index=[f"cand{i}" for i in range(8)])
    latent = rng.normal(size=(30, 1))
    soups = pd.DataFrame(55 + 5 * latent + rng.normal(scale=1.0, size=(30, len(cats))), columns=cats)
    return cand, soups


def test_consistency_soups_more_consistent():
    cand, soups = _populations()
    res = consistency(cand, soups)
    assert res.corr_candidates.shape == res.corr_soups.shape == (5, 5)
    assert np.allclose(np.diag(res.corr_soups), 1.0)
    assert res.mean_r_soups > 0.8 > res.mean_r_candidates
    assert res.mean_abs_r_soups >= res.mean_r_soups
    assert res.more_consistent and res.delta > 0.5
    assert res.n_pairs == 10 and res.excluded == () and res.notes == ()
    # the mean is the plain mean of the upper triangle
    iu = np.triu_indices(5, k=1)
    assert res.mean_r_candidates == pytest.approx(res.corr_candidates.to_numpy()[iu].mean())


def test_consistency_zero_variance_category_excluded():
    cand, soups = _populations()
    soups["flat"] = 50.0
    cand["flat"] = np.linspace(0, 1, len(cand))
    res = consistency(cand, soups[list(cand.columns)[::-1]])  # column order follows the candidates
    assert list(res.corr_soups.columns) == list(cand.columns)
    assert res.excluded == ("flat",)
    assert res.n_pairs == 10
    assert np.isnan(res.corr_soups.loc["flat", "math"])
    assert np.isfinite(res.mean_r_soups) and np.isfinite(res.mean_r_candidates)
    assert any("flat" in n and "soups" in n for n in res.notes)


def test_consistency_rejects_mismatched_categories():
    cand, soups = _populations()
    with pytest.raises(ValueError, match="same categories"):
        consistency(cand, soups.drop(columns="math"))


# ----------------------------------------------------------------------------------- emergent solves

A = [1, 1, 0, 0, 0, 1, 0, 0, 1, 0]
B = [0, 1, 1, 0, 0, 0, 0, 0, 1, 0]
SOUP = [1, 1, 1, 1, 0, 0, 1, 0, 1, 0]


def test_emergent_solves_hand_example():
    # all fail: items 3, 4, 6, 7, 9 (5); the soup solves 3 and 6 -> 2/5.
    # A solves 0, 1, 5, 8 (4); the soup keeps 0, 1, 8 -> 3/4. B solves 1, 2, 8 (3); all kept -> 1.
    res = emergent_solves({"A": A, "B": [bool(x) for x in B]}, [float(x) for x in SOUP])
    assert (res.n_items, res.n_all_fail, res.n_soup_solves_all_fail) == (10, 5, 2)
    assert res.share_emergent == pytest.approx(0.4)
    assert res.n_soup_solved == 6
    a, b = res.per_ingredient["A"], res.per_ingredient["B"]
    assert (a.n_solved, a.n_kept, a.share_kept) == (4, 3, 0.75)
    assert (b.n_solved, b.n_kept, b.share_kept) == (3, 3, 1.0)
    df = res.to_frame()
    assert list(df["ingredient"]) == ["A", "B"]
    assert df.set_index("ingredient").loc["A", "share_kept"] == 0.75
    assert (df["share_emergent"] == 0.4).all()


def test_emergent_solves_nan_safe():
    res = emergent_solves({"A": [1, 1], "B": [0, 0]}, [1, 0])
    assert res.n_all_fail == 0 and math.isnan(res.share_emergent)
    assert math.isnan(res.per_ingredient["B"].share_kept)


def test_emergent_solves_errors():
    with pytest.raises(ValueError, match="length"):
        emergent_solves({"A": A, "B": B[:-1]}, SOUP)
    with pytest.raises(ValueError, match="at least one item"):
        emergent_solves({"A": []}, [])
    with pytest.raises(ValueError, match="at least one ingredient"):
        emergent_solves({}, SOUP)
    with pytest.raises(ValueError, match="0/1"):
        emergent_solves({"A": [0.5] * 10}, SOUP)


def test_emergent_by_category_with_pooled_rows():
    ing = {"x": {"A": A[:5], "B": B[:5]}, "y": {"A": A[5:], "B": B[5:]}}
    soup = {"x": SOUP[:5], "y": SOUP[5:]}
    df = emergent_by_category(ing, soup)
    assert list(df.columns)[0] == "category"
    assert list(df["category"]) == ["x", "x", "y", "y", "all", "all"]
    pooled = df[df["category"] == "all"].set_index("ingredient")
    assert pooled.loc["A", "n_kept"] == 3 and pooled.loc["A", "n_all_fail"] == 5
    # per category: x has all-fail items 3, 4 (soup solves 3); y has 6, 7, 9 (soup solves 6)
    x = df[df["category"] == "x"].iloc[0]
    assert (x["n_all_fail"], x["n_soup_solves_all_fail"]) == (2, 1)
    assert len(emergent_by_category(ing, soup, pooled=None)) == 4
    with pytest.raises(ValueError, match="category 'y'"):
        emergent_by_category({"x": ing["x"], "y": {"A": A[5:], "B": B[5:-1]}}, soup)
