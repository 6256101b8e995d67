"""soce.job.strategies: every registered strategy's plan, and what the registry says of it."""

import pandas as pd
import pytest

from soce import method
from soce.config import SearchConfig, SelectionConfig, StrategyConfig
from soce.job.strategies import STRATEGIES, Context
from soce.search.selections import select

CATS = ["a", "b", "c"]
CANDS = pd.DataFrame(
    {"a": [0.9, 0.2, 0.3, 0.4], "b": [0.1, 0.8, 0.2, 0.5], "c": [0.5, 0.5, 0.7, 0.1]}, index=["m1", "m2", "m3", "m4"]
)
POP = pd.concat([CANDS, pd.DataFrame({"a": [0.1, 0.6], "b": [0.9, 0.2], "c": [0.3, 0.8]}, index=["p1", "p2"])])


def peaked(weights: dict[str, float]) -> dict[str, float]:
    """A smooth objective over the weights with its peak at m1=0.5, m2=0.3, m3=0.2 (the search's input)."""
    target = {"m1": 0.5, "m2": 0.3, "m3": 0.2}
    d = sum((weights.get(k, 0.0) - v) ** 2 for k, v in target.items())
    return {c: 0.8 - d for c in CATS}


def context(search: SearchConfig | None = None, params: StrategyConfig | None = None) -> Context:
    sel = select(POP, CANDS, SelectionConfig(tau=1.0))
    return Context(CANDS, sel, search or SearchConfig(), peaked, params=params or StrategyConfig())


def test_registry_says_which_strategies_evaluate_soups():
    assert {n for n, s in STRATEGIES.items() if s.evaluates} == {"soce_weighted", "greedy_soup"}
    assert {"uniform", "soce_selected", "best_single", "fixed"} <= set(STRATEGIES)


def test_baselines():
    ctx = context()
    assert STRATEGIES["uniform"].plan(ctx).weights == {m: 0.25 for m in CANDS.index}
    assert STRATEGIES["soce_selected"].plan(ctx).weights == {"m1": 1 / 3, "m2": 1 / 3, "m3": 1 / 3}
    assert STRATEGIES["best_single"].plan(ctx).weights == {"m1": 1.0}  # best mean (0.5)


def test_soce_weighted_grid_finds_the_peak():
    plan = STRATEGIES["soce_weighted"].plan(context())
    assert plan.weights == {"m1": 0.5, "m2": 0.3, "m3": 0.2} and len(plan.trace) == 37


def test_optuna_honours_min_weight():
    """search.min_weight was ignored by the optuna search (hard-coded 0.0): weights below it were tried."""
    plan = STRATEGIES["soce_weighted"].plan(context(SearchConfig(name="optuna", n_trials=12, min_weight=0.25)))
    w = plan.trace[[c for c in plan.trace.columns if c.startswith("w.")]]
    assert (w.values >= 0.25 - 0.011).all()  # the floor, up to the 0.01 rounding of optuna points


def test_fixed_normalises_and_refuses_unknown_candidates():
    plan = STRATEGIES["fixed"].plan(context(params=StrategyConfig(ingredients=["m1", "m2"], weights=[3, 1])))
    assert plan.weights == {"m1": 0.75, "m2": 0.25}
    with pytest.raises(method.SelectionError, match="unknown candidate 'zz'"):
        STRATEGIES["fixed"].plan(context(params=StrategyConfig(ingredients=["zz"], weights=[1])))


def test_greedy_soup_adds_while_it_improves():
    plan = STRATEGIES["greedy_soup"].plan(context())
    assert set(plan.weights) <= set(CANDS.index) and plan.trace is not None
