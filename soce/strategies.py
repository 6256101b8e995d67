"""Merge strategies: small functions registered by name, each turning a selection into a soup plan.

Add one with ``@strategy("name")``; it receives a :class:`Context` and returns a :class:`Plan`.
``conf/strategy/<name>.yaml`` makes it selectable from the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from soce import method


@dataclass
class Selection:
    """Algorithm 1 steps 1-2 on the selection split: correlation, L, experts (logged by every strategy)."""

    correlation: pd.DataFrame
    weak: list[str]
    experts: dict[str, str]  # category in L -> its expert
    ingredients: list[str]  # distinct experts, candidate order


@dataclass
class Context:
    """What a strategy may use. Score tables hold the SELECTION split only."""

    candidates: pd.DataFrame  # candidates x categories
    selection: Selection
    search: dict[str, Any]
    evaluate_soup: Callable[[dict[str, float]], dict[str, float]]  # {ingredient: w} -> {category: score}
    on_point: Callable[[int, dict[str, float], dict[str, float]], None] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the strategy's own config


@dataclass
class Plan:
    """The soup to build: its ingredients and weights (summing to 1), and the search trace if any."""

    weights: dict[str, float]
    trace: pd.DataFrame | None = None
    notes: dict[str, Any] = field(default_factory=dict)


STRATEGIES: dict[str, Callable[[Context], Plan]] = {}


def strategy(name: str) -> Callable[[Callable[[Context], Plan]], Callable[[Context], Plan]]:
    def register(fn: Callable[[Context], Plan]) -> Callable[[Context], Plan]:
        STRATEGIES[name] = fn
        return fn

    return register


SELECTION_METHODS = ("threshold", "cluster")


def select(population: pd.DataFrame, candidates: pd.DataFrame, tau: float, tie_break: str,
           max_experts: int | None, how: str = "threshold") -> Selection:
    """Correlate categories across ``population``, take the weak set (or clusters), pick the experts."""
    corr = method.category_correlation(population)
    if how == "threshold":
        weak = method.weak_categories(corr, tau)
        experts = method.select_experts(candidates, weak, tie_break)
    elif how == "cluster":
        clusters = method.category_clusters(corr, tau)
        weak = ["+".join(c) for c in clusters] if len(clusters) > 1 else []
        experts = method.cluster_experts(candidates, clusters if len(clusters) > 1 else [], tie_break)
    else:
        raise method.SelectionError(f"unknown selection.method {how!r}; expected one of {SELECTION_METHODS}")
    return Selection(corr, weak, experts, method.distinct_experts(experts, candidates, max_experts))


def equal(names: list[str]) -> dict[str, float]:
    return {n: 1.0 / len(names) for n in names}


@strategy("uniform")
def uniform(ctx: Context) -> Plan:
    """Baseline (a): every candidate, equal weights."""
    return Plan(equal(list(ctx.candidates.index)))


@strategy("soce_selected")
def soce_selected(ctx: Context) -> Plan:
    """Baseline (b): the SoCE experts, equal weights."""
    return Plan(equal(ctx.selection.ingredients))


SEARCHES = ("grid", "optuna")


@strategy("soce_weighted")
def soce_weighted(ctx: Context) -> Plan:
    """SoCE: the experts, weights searched on the selection split (objective: mean over all categories)."""
    names, s = ctx.selection.ingredients, ctx.search
    if s["name"] == "optuna" and len(names) > 1:
        result = method.optuna_points(names, ctx.evaluate_soup, s["n_trials"], s["seed"], s["storage"],
                                      min_weight=0.0, on_point=ctx.on_point)
        return Plan(result.weights, trace=result.trace)
    if s["name"] not in SEARCHES:
        raise ValueError(f"unknown search {s['name']!r}; available: {', '.join(SEARCHES)}")
    points = method.weight_grid(len(names), s["step"], s["min_weight"], s["include_uniform"])
    result = method.search_weights(names, points, ctx.evaluate_soup, ctx.on_point)
    return Plan(result.weights, trace=result.trace)


@strategy("best_single")
def best_single(ctx: Context) -> Plan:
    """Baseline: the single candidate with the best selection-split overall (no soup)."""
    best = method.overall(ctx.candidates).idxmax()
    return Plan({best: 1.0})


@strategy("greedy_soup")
def greedy(ctx: Context) -> Plan:
    """Baseline: greedy soup (Wortsman et al. 2022) over all candidates, best first, on the selection split."""
    ranked = list(method.overall(ctx.candidates).sort_values(ascending=False, kind="stable").index)
    result = method.greedy_soup(ranked, ctx.evaluate_soup)
    return Plan(result.weights, trace=result.trace)


@strategy("fixed")
def fixed(ctx: Context) -> Plan:
    """Given weights (``strategy.ingredients``, ``strategy.weights``): one point of a spread-out search."""
    names, ws = list(ctx.params.get("ingredients", [])), [float(w) for w in ctx.params.get("weights", [])]
    unknown = [n for n in names if n not in ctx.candidates.index]
    if not names or len(names) != len(ws) or unknown or min(ws) < 0 or sum(ws) <= 0:
        raise method.SelectionError(
            f"strategy=fixed needs strategy.ingredients (candidates) and as many non-negative weights; got "
            f"{names} / {ws}" + (f"; unknown candidate {unknown[0]!r}" if unknown else ""))
    return Plan({n: w / sum(ws) for n, w in zip(names, ws, strict=True)})
