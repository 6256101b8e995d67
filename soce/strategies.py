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


def select(population: pd.DataFrame, candidates: pd.DataFrame, tau: float, tie_break: str,
           max_experts: int | None) -> Selection:
    """Correlate categories across ``population``, take the weak set, pick the candidates' experts."""
    corr = method.category_correlation(population)
    weak = method.weak_categories(corr, tau)
    experts = method.select_experts(candidates, weak, tie_break)
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


@strategy("soce_weighted")
def soce_weighted(ctx: Context) -> Plan:
    """SoCE: the experts, weights searched on the selection split (objective: mean over all categories)."""
    names = ctx.selection.ingredients
    if ctx.search.get("name", "grid") != "grid":
        raise ValueError(f"unknown search {ctx.search['name']!r}; available: grid")
    points = method.weight_grid(
        len(names), ctx.search["step"], ctx.search["min_weight"], ctx.search["include_uniform"]
    )
    result = method.search_weights(names, points, ctx.evaluate_soup, ctx.on_point)
    return Plan(result.weights, trace=result.trace, notes={"search_points": len(points)})


@strategy("best_single")
def best_single(ctx: Context) -> Plan:
    """Baseline: the single candidate with the best selection-split overall (no soup)."""
    best = method.overall(ctx.candidates).idxmax()
    return Plan({best: 1.0})
