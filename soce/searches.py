"""Weight searches (Algorithm 1, step 3): small functions registered by name, one per ``conf/search/`` option.

A search receives a :class:`SearchContext` and returns a :class:`soce.method.SearchResult` (the best
weights, their scores and the trace of every point tried). Add one with ``@search("name")`` and a
``conf/search/<name>.yaml``; ``search.name`` picks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from soce import method
from soce.config import SearchConfig

Evaluate = Callable[[dict[str, float]], dict[str, float]]  # {ingredient: w} -> {category: score, "overall"}
EvaluateItems = Callable[[dict[str, float], dict[str, list[str]]], dict[str, Any]]  # + items -> Scores
OnPoint = Callable[[int, dict[str, float], dict[str, float]], None]


@dataclass
class SearchContext:
    """What a search may use. Every evaluation reads the SELECTION split only."""

    ingredients: list[str]  # the distinct experts, candidate order
    evaluate: Evaluate  # a whole-split evaluation of one weight point (cached)
    config: SearchConfig
    on_point: OnPoint | None = None
    evaluate_items: EvaluateItems | None = None  # an evaluation on some items only (None: not available)
    item_ids: dict[str, list[str]] | None = None  # the selection split's items per category
    evaluate_many: Callable[[list[dict[str, float]]], list[dict[str, float]]] | None = None  # several at once


SearchFn = Callable[[SearchContext], method.SearchResult]


@dataclass(frozen=True)
class Search:
    """A registered search and what it needs."""

    name: str
    run: SearchFn
    needs_items: bool = False  # evaluates item subsets (needs a backend that can)


SEARCHES: dict[str, Search] = {}


def search(name: str, needs_items: bool = False) -> Callable[[SearchFn], SearchFn]:
    """Register ``fn(ctx) -> SearchResult`` as the search ``name``."""

    def register(fn: SearchFn) -> SearchFn:
        SEARCHES[name] = Search(name, fn, needs_items)
        return fn

    return register


@search("grid")
def grid(ctx: SearchContext) -> method.SearchResult:
    """The paper's grid: every weight a multiple of ``step``, at least ``min_weight``, plus the uniform point."""
    c = ctx.config
    points = method.weight_grid(len(ctx.ingredients), c.step, c.min_weight, c.include_uniform)
    evaluate = ctx.evaluate
    if ctx.evaluate_many is not None:  # every point at once over the workers, then the serial search replayed
        from soce import parallel

        ws = [dict(zip(ctx.ingredients, map(float, p), strict=True)) for p in points]
        evaluate = parallel.replay(ws, ctx.evaluate_many(ws))
    return method.search_weights(ctx.ingredients, points, evaluate, ctx.on_point)


@search("optuna")
def optuna(ctx: SearchContext) -> method.SearchResult:
    """A model-based search (optuna's TPE or GP sampler) with a budget of ``n_trials`` evaluations."""
    c = ctx.config
    if len(ctx.ingredients) == 1:
        return method.search_weights(ctx.ingredients, [(1.0,)], ctx.evaluate, ctx.on_point)
    return method.optuna_points(ctx.ingredients, ctx.evaluate, c.n_trials, c.seed, c.storage,
                                min_weight=c.min_weight, on_point=ctx.on_point, sampler=c.sampler)
