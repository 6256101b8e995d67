"""The search registry on a synthetic benchmark: grid/optuna budgets, race (grid and optuna proposals),
what each search spends (``SearchResult.notes``), and a race resumed through the item cache."""

import dataclasses

import numpy as np
import pytest

from soce import method
from soce.config import ConfigError, SearchConfig
from soce.search import searches
from soce.search.items import ItemCache

NAMES = ["a", "b", "c"]
CATS = [f"k{j}" for j in range(6)]
N = 120


def config(**kw) -> SearchConfig:
    """A SearchConfig; keys the schema may not declare yet (race_*, proposal) are set as attributes."""
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    cfg = SearchConfig(**{k: v for k, v in kw.items() if k in known})
    for k, v in kw.items():
        if k not in known:
            setattr(cfg, k, v)
    return cfg


class Bench:
    """A fake selection split: per-item 0/1 outcomes of any weight point (common random numbers)."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.skill = rng.uniform(0.2, 0.8, size=(3, len(CATS)))
        self.u = rng.uniform(size=(len(CATS), N))
        self.items_asked = 0
        self.full_calls = 0

    def outcome(self, w):
        w = np.array([w[n] for n in NAMES])
        q = w @ self.skill - 2.0 * ((w - np.array([0.5, 0.3, 0.2])) ** 2).sum()
        return (self.u < q[:, None]).astype(float)

    def evaluate(self, w):
        self.full_calls += 1
        y = self.outcome(w)
        scores = {c: float(y[j].mean()) for j, c in enumerate(CATS)}
        return {**scores, "overall": float(np.mean(list(scores.values())))}

    def evaluate_items(self, w, items):
        """The benchmark contract's Scores: category means, samples and item_ids (same order)."""
        y = self.outcome(w)
        self.items_asked += sum(len(v) for v in items.values())
        ids = {c: sorted(v, key=int) for c, v in items.items()}
        samples = {c: [float(y[CATS.index(c), int(i)]) for i in v] for c, v in ids.items()}
        return {**{c: float(np.mean(s)) for c, s in samples.items()}, "samples": samples, "item_ids": ids}

    def context(self, cfg, on_point=None, evaluate_items=None):
        return searches.SearchContext(
            NAMES,
            self.evaluate,
            cfg,
            on_point,
            evaluate_items or self.evaluate_items,
            {c: [str(i) for i in range(N)] for c in CATS},
        )


def test_grid_records_points_and_items_and_refuses_a_budget_below_it():
    b = Bench()
    res = searches.SEARCHES["grid"].run(b.context(config()))
    assert res.notes == {"points": 37, "items_evaluated": 37 * 720, "full_split_equivalents": 37.0}
    with pytest.raises(method.SelectionError, match=r"search=grid needs 37 full .* over search.budget=20"):
        searches.SEARCHES["grid"].run(b.context(config(budget=20)))
    assert searches.SEARCHES["grid"].run(b.context(config(budget=37))).notes["points"] == 37


def test_optuna_is_capped_by_the_budget():
    b = Bench()
    res = searches.SEARCHES["optuna"].run(b.context(config(n_trials=15, budget=6.5, min_weight=0.0)))
    assert len(res.trace) == 6 and res.notes["trials"] == 6 and b.full_calls == 6
    assert res.notes["full_split_equivalents"] <= 6


def test_race_over_the_grid_matches_the_grid_for_a_fraction_of_its_items():
    b = Bench()
    grid = searches.SEARCHES["grid"].run(b.context(config()))
    b2, finals = Bench(), []
    res = searches.SEARCHES["race"].run(
        b2.context(config(budget=0.2 * 37), on_point=lambda i, w, s: finals.append((i, w, s)))
    )
    assert searches.SEARCHES["race"].needs_items
    assert res.weights == grid.weights
    assert res.scores["overall"] == pytest.approx(grid.scores["overall"])
    assert {c: res.scores[c] for c in CATS} == pytest.approx({c: grid.scores[c] for c in CATS})
    assert b2.full_calls == 0  # the race never runs a whole-split evaluation: items only
    n = res.notes
    assert n["points"] == 37 and n["items_evaluated"] == b2.items_asked <= 0.2 * 37 * 720
    assert n["full_split_equivalents"] == pytest.approx(n["items_evaluated"] / 720)
    assert len(res.trace) == 37 and {"w.a", "items", "dropped_in_round", "estimate", "overall"} <= set(res.trace)
    assert finals and all(not np.isnan(s["overall"]) for _, _, s in finals)  # on_point: whole-split scores only


@pytest.mark.parametrize("proposal", ["tpe", "gp"])
def test_race_over_optuna_proposals(proposal):
    b = Bench()
    cfg = config(proposal=proposal, n_trials=12, seed=1, min_weight=0.1, budget=6)
    res = searches.SEARCHES["race"].run(b.context(cfg))
    again = searches.SEARCHES["race"].run(Bench().context(cfg))
    assert res.weights == again.weights  # seeded
    assert res.notes["proposal"] == proposal and 1 <= res.notes["points"] <= 12
    assert res.notes["items_evaluated"] == b.items_asked <= 6 * 720  # proposals share the race's first items
    assert min(res.weights.values()) >= 0.1 - 1e-9 and sum(res.weights.values()) == pytest.approx(1.0)


def test_race_needs_item_evaluations_and_a_known_proposal():
    b = Bench()
    ctx = dataclasses.replace(b.context(config()), evaluate_items=None)
    with pytest.raises(method.SelectionError, match="search=race needs item-level evaluations"):
        searches.SEARCHES["race"].run(ctx)
    with pytest.raises(ConfigError, match="search.proposal must be one of grid, tpe, gp"):
        config(proposal="random").validate()


def test_race_resumed_through_the_item_cache_evaluates_nothing_twice(tmp_path):
    b = Bench()

    def cached(cache):
        def evaluate_items(w, items):
            key = "-".join(f"{w[n]:.4f}" for n in NAMES)
            return cache.get_or_compute(key, items, lambda missing: searches.item_table(b.evaluate_items(w, missing)))

        return evaluate_items

    first = ItemCache(tmp_path)
    r1 = searches.SEARCHES["race"].run(b.context(config(budget=8), evaluate_items=cached(first)))
    asked = b.items_asked
    assert first.items_evaluated == asked == r1.notes["items_evaluated"]
    second = ItemCache(tmp_path)
    r2 = searches.SEARCHES["race"].run(b.context(config(budget=8), evaluate_items=cached(second)))
    assert b.items_asked == asked and second.items_evaluated == 0 and second.items_cached == asked
    assert r2.weights == r1.weights and r2.notes["items_evaluated"] == r1.notes["items_evaluated"]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"proposal": "random"}, "search.proposal"),
        ({"race_delta": 1.5}, "race_delta"),
        ({"race_keep": 0.0}, "race_keep"),
        ({"budget": 0.0}, "search.budget"),
    ],
)
def test_bad_race_settings_are_refused_by_the_config_in_one_line(kw, message):
    with pytest.raises(ConfigError, match=message):
        config(**kw).validate()
    config().validate()  # the defaults run


def test_item_table_reads_both_shapes_and_refuses_others():
    assert searches.item_table({"x": 0.5, "samples": {"x": [1.0, 0.0]}, "item_ids": {"x": ["3", "7"]}}) == {
        "x": {"3": 1.0, "7": 0.0}
    }
    assert searches.item_table({"x": {"3": 1}}) == {"x": {"3": 1.0}}
    with pytest.raises(method.SelectionError, match="neither per-item samples"):
        searches.item_table({"x": 0.5})
