"""Weight searches (Algorithm 1, step 3): small functions registered by name, one per ``conf/search/`` option.

A search receives a :class:`SearchContext` and returns a :class:`soce.method.SearchResult` (the best
weights, their scores and the trace of every point tried). Add one with ``@search("name")`` and a
``conf/search/<name>.yaml``; ``search.name`` picks it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from soce import method
from soce.config import SearchConfig
from soce.search import race as racing

log = logging.getLogger(__name__)

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
    category_weights: dict[str, float] | None = None  # objective = sum_c a_c * score_c (None: mean of categories)


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


def spent(points: int, full_evaluations: float, item_ids: dict[str, list[str]] | None) -> dict[str, Any]:
    """What a search spent, for ``SearchResult.notes``: points tried, items evaluated (None when the split's
    items are unknown) and full selection-split equivalents (items / items in the split)."""
    n = sum(len(v) for v in item_ids.values()) if item_ids else None
    return {
        "points": points,
        "items_evaluated": None if n is None else round(full_evaluations * n),
        "full_split_equivalents": full_evaluations,
    }


@search("grid")
def grid(ctx: SearchContext) -> method.SearchResult:
    """The paper's grid: every weight a multiple of ``step``, at least ``min_weight``, plus the uniform point.
    Refuses (one line) a grid larger than ``search.budget`` full evaluations: the grid has no partial answer."""
    c = ctx.config
    points = method.weight_grid(len(ctx.ingredients), c.step, c.min_weight, c.include_uniform)
    if c.budget is not None and len(points) > c.budget:
        raise method.SelectionError(
            f"search=grid needs {len(points)} full selection-split evaluations for {len(ctx.ingredients)} experts, "
            f"over search.budget={c.budget:g}; raise the budget, or use search=race or search=optuna"
        )
    evaluate = ctx.evaluate
    if ctx.evaluate_many is not None:  # every point at once over the workers, then the serial search replayed
        from soce.search import parallel

        ws = [dict(zip(ctx.ingredients, map(float, p), strict=True)) for p in points]
        evaluate = parallel.replay(ws, ctx.evaluate_many(ws))
    result = method.search_weights(ctx.ingredients, points, evaluate, ctx.on_point)
    result.notes = spent(len(points), float(len(points)), ctx.item_ids)
    return result


@search("optuna")
def optuna(ctx: SearchContext) -> method.SearchResult:
    """A model-based search (optuna's TPE or GP sampler) with ``min(n_trials, budget)`` evaluations."""
    c = ctx.config
    if len(ctx.ingredients) == 1:
        result = method.search_weights(ctx.ingredients, [(1.0,)], ctx.evaluate, ctx.on_point)
        result.notes = spent(1, 1.0, ctx.item_ids)
        return result
    n_trials = c.n_trials
    if c.budget is not None and c.budget < n_trials:
        n_trials = max(1, math.floor(c.budget))
        log.info("search.budget=%g caps optuna at %d trials (n_trials=%d)", c.budget, n_trials, c.n_trials)
    result = method.optuna_points(
        ctx.ingredients,
        ctx.evaluate,
        n_trials,
        c.seed,
        c.storage,
        min_weight=c.min_weight,
        on_point=ctx.on_point,
        sampler=c.sampler,
    )
    distinct = len(result.trace[[f"w.{n}" for n in ctx.ingredients]].drop_duplicates())  # repeats: cached
    result.notes = {**spent(len(result.trace), float(distinct), ctx.item_ids), "trials": n_trials}
    return result


def race_settings(c: SearchConfig) -> racing.RaceSettings:
    """The racing rule's settings from ``search.race_*`` (null: the rule's own default) and seed/budget."""
    given = {
        "delta": c.race_delta,
        "start": c.race_start,
        "growth": c.race_growth,
        "finalists": c.race_finalists,
        "keep": c.race_keep,
    }
    return racing.RaceSettings(**{k: v for k, v in given.items() if v is not None}, seed=c.seed, budget=c.budget)


@search("race", needs_items=True)
def race(ctx: SearchContext) -> method.SearchResult:
    """Race weight points on shared items of the selection split (:mod:`soce.search.race`): the grid's points or
    optuna's proposals (``search.proposal``), dropped on paired confidence bounds, finalists on the whole split."""
    c, names = ctx.config, ctx.ingredients
    if ctx.evaluate_items is None or not ctx.item_ids:
        raise method.SelectionError(
            "search=race needs item-level evaluations of the selection split; this job's "
            "evaluator has none (use search=grid or search=optuna)"
        )
    settings = race_settings(c)
    memo = _ItemMemo(ctx)
    points = race_points(ctx, settings, memo)
    outcome = racing.race(
        len(points), ctx.item_ids, lambda p, items: memo.get(points[p], items), settings, ctx.category_weights
    )
    best = dict(zip(names, points[outcome.best], strict=True))
    rows = [
        {**{f"w.{n}": w for n, w in zip(names, points[r["point"]], strict=True)}, **r, "overall": r.pop("full_overall")}
        for r in outcome.points
    ]
    for r in rows:
        if not math.isnan(r["overall"]) and ctx.on_point is not None:
            ctx.on_point(r["point"], dict(zip(names, points[r["point"]], strict=True)), {"overall": r["overall"]})
    notes = {
        **spent(len(points), outcome.full_split_equivalents, ctx.item_ids),
        "items_evaluated": outcome.items_evaluated,
        "rounds": outcome.rounds,
        "proposal": c.proposal,
        "rule": "paired z race (Bonferroni) + halving",
        "delta": settings.delta,
        "budget": settings.budget,
    }
    log.info(
        "race: %d points, %d items evaluated (%.2f full-split equivalents) -> %s",
        len(points),
        outcome.items_evaluated,
        outcome.full_split_equivalents,
        best,
    )
    return method.SearchResult(best, outcome.scores, pd.DataFrame(rows), notes)


def race_points(ctx: SearchContext, settings: racing.RaceSettings, memo: _ItemMemo) -> list[tuple[float, ...]]:
    """The points to race: the grid, or the distinct proposals of optuna's TPE/GP sampler run on the race's
    first item subset (the same items the race starts on, so the proposals cost nothing twice)."""
    c, names = ctx.config, ctx.ingredients
    proposal = c.proposal
    if proposal == "grid" or len(names) == 1:
        return method.weight_grid(len(names), c.step, c.min_weight, c.include_uniform)
    first = racing.first_subset(ctx.item_ids, settings)
    a = racing.objective_weights(list(first), ctx.category_weights)

    def on_subset(weights: dict[str, float]) -> dict[str, float]:
        got = memo.get(tuple(weights[n] for n in names), first)
        return {"overall": sum(a[k] * sum(v.values()) / len(v) for k, v in got.items())}

    trials = method.optuna_points(names, on_subset, c.n_trials, c.seed, None, min_weight=c.min_weight, sampler=proposal)
    return list(dict.fromkeys(tuple(float(r[f"w.{n}"]) for n in names) for _, r in trials.trace.iterrows()))


class _ItemMemo:
    """Per-item scores of each point seen in this search (so proposals and race share evaluations); asks
    ``ctx.evaluate_items`` only for items it lacks."""

    def __init__(self, ctx: SearchContext):
        self.ctx = ctx
        self.seen: dict[tuple[float, ...], dict[str, dict[str, float]]] = {}

    def get(self, point: tuple[float, ...], items: dict[str, list[str]]) -> dict[str, dict[str, float]]:
        have = self.seen.setdefault(tuple(point), {})
        missing = {c: [i for i in ids if i not in have.get(c, {})] for c, ids in items.items()}
        missing = {c: ids for c, ids in missing.items() if ids}
        if missing:
            weights = dict(zip(self.ctx.ingredients, point, strict=True))
            for c, scores in item_table(self.ctx.evaluate_items(weights, missing)).items():
                have.setdefault(c, {}).update(scores)
        return {c: {i: have[c][i] for i in ids if i in have.get(c, {})} for c, ids in items.items()}


def item_table(scores: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{category: {item_id: score}}`` from an item evaluation: a :data:`soce.benchmarks.Scores` dict (``samples``
    and ``item_ids``, same order) or already ``{category: {item_id: score}}``."""
    if "samples" in scores and "item_ids" in scores:
        return {
            c: {str(i): float(s) for i, s in zip(scores["item_ids"][c], scores["samples"][c], strict=True)}
            for c in scores["samples"]
        }
    if all(isinstance(v, dict) for v in scores.values()):
        return {c: {str(i): float(s) for i, s in v.items()} for c, v in scores.items()}
    raise method.SelectionError(
        "an item evaluation returned neither per-item samples with item_ids nor {category: {item_id: score}}"
    )
