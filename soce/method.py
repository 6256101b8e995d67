"""The SoCE algorithm (Maiti et al. 2025, Algorithm 1), on plain score tables.

    1. correlate:  Pearson correlation of every pair of categories across a population of models
    2. weak set:   L = {c : |rho(c, c')| < tau for at least one other category c'}
    3. experts:    for each c in L, argmax_j P[j, c]; the soup's ingredients are the distinct experts
    4. search:     every weight vector on the grid (each w_j in {0.1, ..., 0.9}, sum 1) plus the equal-weight
                   point; keep the one with the best objective (mean score over ALL categories)

Score tables are pandas DataFrames: rows = models, columns = categories, values = scores in [0, 1].
Nothing here loads a model; ``search_weights`` takes the evaluation as a function.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

log = logging.getLogger(__name__)

TIE_BREAKS = ("overall", "first")


class SelectionError(ValueError):
    """Bad input for selection or search (one line naming the problem)."""


def overall(scores: pd.DataFrame | pd.Series) -> pd.Series | float:
    """The objective: the unweighted mean over all categories (per row for a table)."""
    if isinstance(scores, pd.DataFrame):
        return scores.mean(axis=1)
    return float(scores.mean())


def category_correlation(population: pd.DataFrame) -> pd.DataFrame:
    """Pearson correlation between categories (columns) across the models (rows) of ``population``.

    Needs at least 3 models. A category with no variance across the population has an undefined
    correlation: its row and column are NaN.
    """
    if len(population) < 3:
        raise SelectionError(
            f"correlation needs a population of at least 3 models, got {len(population)}"
        )
    return population.astype(float).corr(method="pearson")


def weak_categories(corr: pd.DataFrame, tau: float) -> list[str]:
    """L: categories whose |rho| with at least one other category is below ``tau`` (table order).

    Categories with an undefined correlation (no variance: no model is better than another there)
    cannot have an expert and are left out of L.
    """
    if not 0.0 <= tau <= 1.0:
        raise SelectionError(f"tau must be in [0, 1], got {tau}")
    weak = []
    for c in corr.columns:
        others = corr.loc[c].drop(index=c)
        if others.isna().all():
            log.warning("category %r has no variance across the population: left out of L", c)
            continue
        if (others.abs() < tau).any():
            weak.append(c)
    return weak


def select_experts(
    scores: pd.DataFrame, weak: Sequence[str], tie_break: str = "overall"
) -> dict[str, str]:
    """The expert (best candidate) of every category in ``weak``, as {category: candidate}.

    Ties on a category are broken by ``tie_break``: ``overall`` prefers the higher mean over all
    categories, then the earlier candidate in the table; ``first`` takes the earlier candidate.
    An empty L yields the single best-overall candidate, filed under the key ``"overall"``.
    """
    if tie_break not in TIE_BREAKS:
        raise SelectionError(f"unknown tie_break {tie_break!r}; expected one of {', '.join(TIE_BREAKS)}")
    order = {name: i for i, name in enumerate(scores.index)}
    means = overall(scores)

    def rank(candidate: str, value: float) -> tuple:
        if tie_break == "overall":
            return (-value, -means[candidate], order[candidate])
        return (-value, order[candidate])

    if not weak:
        best = min(scores.index, key=lambda m: (-means[m], order[m]))
        log.warning("L is empty (all categories correlate >= tau): the soup is the best single candidate")
        return {"overall": best}
    return {c: min(scores.index, key=lambda m: rank(m, scores.at[m, c])) for c in weak}


def distinct_experts(experts: dict[str, str], scores: pd.DataFrame, max_experts: int | None = None) -> list[str]:
    """The soup's ingredients: distinct experts in candidate-table order, capped to the best-overall ones."""
    chosen = [m for m in scores.index if m in set(experts.values())]
    if max_experts is not None and len(chosen) > max_experts:
        means = overall(scores)
        keep = set(sorted(chosen, key=lambda m: -means[m])[:max_experts])
        chosen = [m for m in chosen if m in keep]
    return chosen


def weight_grid(
    n: int, step: float = 0.1, min_weight: float = 0.1, include_uniform: bool = True
) -> list[tuple[float, ...]]:
    """The paper's grid: every vector with each weight a multiple of ``step``, at least ``min_weight``,
    summing to 1; then the equal-weight point if it is not on the grid already.

    Counts for step 0.1, min 0.1: n=2 -> 9, 3 -> 36, 4 -> 84, 5 -> 126 (+1 uniform). n=1 -> [(1.0,)].
    """
    if n < 1:
        raise SelectionError("the weight grid needs at least one ingredient")
    if not 0 < step <= 1:
        raise SelectionError(f"search.step must be in (0, 1], got {step}")
    units = round(1 / step)
    if not math.isclose(units * step, 1.0, abs_tol=1e-9):
        raise SelectionError(f"search.step must divide 1 evenly, got {step}")
    lo = math.ceil(round(min_weight / step, 9))
    if n == 1:
        return [(1.0,)]
    free = units - n * lo  # units left after each weight gets its minimum
    if free < 0:
        raise SelectionError(f"{n} ingredients cannot each get >= {min_weight} with weights summing to 1")
    grid = []
    # stars and bars: place n-1 bars among free + n-1 slots
    for bars in itertools.combinations(range(free + n - 1), n - 1):
        edges = (-1, *bars, free + n - 1)
        parts = [edges[i + 1] - edges[i] - 1 + lo for i in range(n)]
        grid.append(tuple(round(p * step, 10) for p in parts))
    grid.sort(reverse=True)
    uniform = tuple([round(1 / n, 10)] * n)
    on_grid = any(all(math.isclose(a, b) for a, b in zip(p, uniform, strict=True)) for p in grid)
    if include_uniform and not on_grid:
        grid.append(uniform)
    return grid


@dataclass
class SearchResult:
    """Best weights found and every point tried (``trace``: one row per point, weights and scores)."""

    weights: dict[str, float]
    scores: dict[str, float]
    trace: pd.DataFrame


def search_weights(
    ingredients: Sequence[str],
    points: Sequence[Sequence[float]],
    evaluate: Callable[[dict[str, float]], dict[str, float]],
    on_point: Callable[[int, dict[str, float], dict[str, float]], None] | None = None,
) -> SearchResult:
    """Evaluate each weight point and keep the best by ``overall`` (ties: the earlier point).

    ``evaluate`` maps {ingredient: weight} to {category: score} on the selection split.
    """
    if not points:
        raise SelectionError("the weight search has no points to evaluate")
    rows, best = [], None
    for i, point in enumerate(points):
        weights = dict(zip(ingredients, (float(w) for w in point), strict=True))
        cat_scores = evaluate(weights)
        score = overall(pd.Series(cat_scores))
        rows.append({"point": i, **{f"w.{k}": v for k, v in weights.items()}, **cat_scores, "overall": score})
        if on_point is not None:
            on_point(i, weights, {**cat_scores, "overall": score})
        if best is None or score > best[0]:
            best = (score, weights, cat_scores)
    return SearchResult(weights=best[1], scores={**best[2], "overall": best[0]}, trace=pd.DataFrame(rows))
