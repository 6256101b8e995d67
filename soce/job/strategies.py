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
from soce.config import SearchConfig, StrategyConfig
from soce.search.searches import SEARCHES, Evaluate, EvaluateItems, OnPoint, SearchContext
from soce.search.selections import Selection


@dataclass
class Context:
    """What a strategy may use. Score tables and evaluations hold the SELECTION split only."""

    candidates: pd.DataFrame  # candidates x categories
    selection: Selection
    search: SearchConfig
    evaluate_soup: Evaluate  # {ingredient: w} -> {category: score, "overall": objective}
    on_point: OnPoint | None = None
    params: StrategyConfig = field(default_factory=StrategyConfig)  # the strategy's own config
    evaluate_items: EvaluateItems | None = None
    item_ids: dict[str, list[str]] | None = None
    evaluate_many: Callable[[list[dict[str, float]]], list[dict[str, float]]] | None = None  # points at once

    def search_context(self) -> SearchContext:
        return SearchContext(
            self.selection.ingredients,
            self.evaluate_soup,
            self.search,
            self.on_point,
            self.evaluate_items,
            self.item_ids,
            self.evaluate_many,
        )


@dataclass
class Plan:
    """The soup to build: its ingredients and weights (summing to 1), and the search trace if any."""

    weights: dict[str, float]
    trace: pd.DataFrame | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Strategy:
    """A registered strategy; ``evaluates``: it evaluates soups, so it needs checkpoints (not a score table);
    ``selects``: its soup is made of the selection's experts (others neither use nor report a selection)."""

    name: str
    plan: Callable[[Context], Plan]
    evaluates: bool = False
    selects: bool = False


STRATEGIES: dict[str, Strategy] = {}


def strategy(
    name: str, evaluates: bool = False, selects: bool = False
) -> Callable[[Callable[[Context], Plan]], Callable[[Context], Plan]]:
    """Register ``fn(ctx) -> Plan`` as the strategy ``name`` (``conf/strategy/<name>.yaml`` selects it)."""

    def register(fn: Callable[[Context], Plan]) -> Callable[[Context], Plan]:
        STRATEGIES[name] = Strategy(name, fn, evaluates, selects)
        return fn

    return register


def equal(names: list[str]) -> dict[str, float]:
    return {n: 1.0 / len(names) for n in names}


@strategy("uniform")
def uniform(ctx: Context) -> Plan:
    """Baseline (a): every candidate, equal weights."""
    return Plan(equal(list(ctx.candidates.index)))


@strategy("soce_selected", selects=True)
def soce_selected(ctx: Context) -> Plan:
    """Baseline (b): the SoCE experts, equal weights."""
    return Plan(equal(ctx.selection.ingredients))


@strategy("soce_weighted", evaluates=True, selects=True)
def soce_weighted(ctx: Context) -> Plan:
    """SoCE: the experts, weights searched on the selection split (``search`` group; objective: overall)."""
    result = SEARCHES[ctx.search.name].run(ctx.search_context())
    return Plan(result.weights, trace=result.trace, notes=result.notes)


@strategy("best_single")
def best_single(ctx: Context) -> Plan:
    """Baseline: the single candidate with the best selection-split overall (no soup)."""
    best = method.overall(ctx.candidates).idxmax()
    return Plan({best: 1.0})


@strategy("greedy_soup", evaluates=True)
def greedy(ctx: Context) -> Plan:
    """Baseline: greedy soup (Wortsman et al. 2022) over all candidates, best first, on the selection split."""
    ranked = list(method.overall(ctx.candidates).sort_values(ascending=False, kind="stable").index)
    result = method.greedy_soup(ranked, ctx.evaluate_soup)
    return Plan(result.weights, trace=result.trace)


@strategy("fixed")
def fixed(ctx: Context) -> Plan:
    """Given weights (``strategy.ingredients``, ``strategy.weights``): one point of a spread-out search."""
    names, ws = list(ctx.params.ingredients), [float(w) for w in ctx.params.weights]
    unknown = [n for n in names if n not in ctx.candidates.index]
    if not names or len(names) != len(ws) or unknown or min(ws) < 0 or sum(ws) <= 0:
        raise method.SelectionError(
            f"strategy=fixed needs strategy.ingredients (candidates) and as many non-negative weights; got "
            f"{names} / {ws}" + (f"; unknown candidate {unknown[0]!r}" if unknown else "")
        )
    return Plan({n: w / sum(ws) for n, w in zip(names, ws, strict=True)})
