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
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

TIE_BREAKS = ("overall", "first")  # selection.tie_break: overall (higher select-split overall wins), first


class SelectionError(ValueError):
    """Bad input for selection or search (one line naming the problem)."""


def overall(scores: pd.DataFrame | pd.Series) -> pd.Series | float:
    """The objective: the unweighted mean over all categories (per row for a table)."""
    if isinstance(scores, pd.DataFrame):
        return scores.mean(axis=1)
    return float(scores.mean())


def objective_of(scores: dict[str, float]) -> float:
    """The search objective of one evaluation: its ``overall`` when the benchmark computed one (e.g. BFCL's
    official overall), else the mean over its categories (the paper's)."""
    if "overall" in scores:
        return float(scores["overall"])
    return float(overall(pd.Series(scores)))


def category_correlation(population: pd.DataFrame) -> pd.DataFrame:
    """Pearson correlation between categories (columns) across the models (rows) of ``population``.

    Needs at least 3 models. A category with no variance across the population has an undefined
    correlation: its row and column are NaN.
    """
    if len(population) < 3:
        raise SelectionError(f"correlation needs a population of at least 3 models, got {len(population)}")
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
    scores: pd.DataFrame, weak: Sequence[str], tie_break: str = "overall", means: pd.Series | None = None
) -> dict[str, str]:
    """The expert (best candidate) of every category in ``weak``, as {category: candidate}.

    Ties on a category are broken by ``tie_break``: ``overall`` prefers the higher mean over all
    categories, then the earlier candidate in the table; ``first`` takes the earlier candidate.
    An empty L yields the single best-overall candidate, filed under the key ``"overall"``.
    ``means`` overrides the overall scores used for tie-breaks (default: the row means of ``scores``).
    """
    if tie_break not in TIE_BREAKS:
        raise SelectionError(f"unknown tie_break {tie_break!r}; expected one of {', '.join(TIE_BREAKS)}")
    order = {name: i for i, name in enumerate(scores.index)}
    means = overall(scores) if means is None else means

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


def category_clusters(corr: pd.DataFrame, tau: float) -> list[list[str]]:
    """Average-linkage clustering of categories on the distance 1 - |rho|, cut at 1 - tau.

    Two clusters merge while their mean |rho| is at least ``tau``; categories with no variance are
    dropped. An alternative to the weak set: one expert per cluster (``selection.method=cluster``).
    """
    cats = [c for c in corr.columns if not corr.loc[c].drop(index=c).isna().all()]
    a = corr.loc[cats, cats].abs().fillna(0.0)
    clusters = [[c] for c in cats]
    while len(clusters) > 1:
        best, pair = -1.0, None
        for i, j in itertools.combinations(range(len(clusters)), 2):
            link = float(a.loc[clusters[i], clusters[j]].values.mean())
            if link > best:
                best, pair = link, (i, j)
        if best < tau:
            break
        i, j = pair
        clusters[i] = clusters[i] + clusters.pop(j)
    order = {c: k for k, c in enumerate(cats)}
    return sorted((sorted(c, key=order.get) for c in clusters), key=lambda c: order[c[0]])


def cluster_experts(
    scores: pd.DataFrame, clusters: Sequence[Sequence[str]], tie_break: str = "overall"
) -> dict[str, str]:
    """The expert of each cluster (best candidate on the cluster's mean score), keyed by '+'-joined names."""
    if not clusters:
        return select_experts(scores, [], tie_break)
    means = pd.DataFrame({"+".join(c): scores[list(c)].mean(axis=1) for c in clusters})
    return select_experts(means, list(means.columns), tie_break, overall(scores))


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
    notes: dict[str, Any] = field(default_factory=dict)  # what the search spent (points, items) and how


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
        score = objective_of(cat_scores)
        rows.append({"point": i, **{f"w.{k}": v for k, v in weights.items()}, **cat_scores, "overall": score})
        if on_point is not None:
            on_point(i, weights, {**cat_scores, "overall": score})
        if best is None or score > best[0]:
            best = (score, weights, cat_scores)
    return SearchResult(weights=best[1], scores={**best[2], "overall": best[0]}, trace=pd.DataFrame(rows))


def optuna_points(
    ingredients: Sequence[str],
    evaluate: Callable[[dict[str, float]], dict[str, float]],
    n_trials: int,
    seed: int = 0,
    storage: str | None = None,
    study_name: str = "soce",
    min_weight: float = 0.0,
    on_point: Callable[[int, dict[str, float], dict[str, float]], None] | None = None,
    sampler: str = "tpe",
) -> SearchResult:
    """TPE search of the weights (optuna), maximising ``overall``; resumable from ``storage``.

    Each trial draws one raw value per ingredient in [0, 1]; weights are the raw values normalised to
    sum 1 with each at least ``min_weight`` (min_weight + (1 - n min_weight) r_i / sum r), rounded to 0.01
    (so nearby points share cache entries).
    ``n_trials`` is the study's total budget: a resumed study only runs the trials it is missing.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    free = 1.0 - len(ingredients) * min_weight
    if free < 0:
        raise SelectionError(
            f"{len(ingredients)} ingredients cannot each get >= {min_weight} with weights summing to 1"
        )
    samplers = {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler}
    if sampler not in samplers:
        raise SelectionError(f"search.sampler must be one of {', '.join(samplers)}, got {sampler!r}")
    study = optuna.create_study(
        direction="maximize",
        sampler=samplers[sampler](seed=seed),
        storage=storage,
        study_name=study_name,
        load_if_exists=storage is not None,
    )

    def weights_of(params: dict[str, float]) -> dict[str, float]:
        raw = [max(params[f"r.{n}"], 1e-6) for n in ingredients]
        w = [min_weight + free * r / sum(raw) for r in raw]  # on the simplex, each weight >= min_weight
        w = [round(x, 2) for x in w]
        w[0] = round(1.0 - sum(w[1:]), 2)  # exact sum 1 after rounding
        return dict(zip(ingredients, w, strict=True))

    def objective(trial: optuna.Trial) -> float:
        params = {f"r.{n}": trial.suggest_float(f"r.{n}", 0.0, 1.0) for n in ingredients}
        weights = weights_of(params)
        cat_scores = evaluate(weights)
        score = objective_of(cat_scores)
        trial.set_user_attr("weights", weights)
        trial.set_user_attr("scores", cat_scores)
        if on_point is not None:
            on_point(trial.number, weights, {**cat_scores, "overall": score})
        return score

    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if n_trials > done:
        study.optimize(objective, n_trials=n_trials - done)
    return study_result(study)


def study_result(study: Any) -> SearchResult:
    """The best completed trial of an optuna study (ties: the earlier) and the trace of every completed one."""
    import optuna

    rows, best = [], None
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        w, cs = t.user_attrs["weights"], t.user_attrs["scores"]
        rows.append({"point": t.number, **{f"w.{k}": v for k, v in w.items()}, **cs, "overall": t.value})
        if best is None or t.value > best[0]:
            best = (t.value, w, cs)
    return SearchResult(weights=best[1], scores={**best[2], "overall": best[0]}, trace=pd.DataFrame(rows))


def greedy_soup(ranked: Sequence[str], evaluate: Callable[[dict[str, float]], dict[str, float]]) -> SearchResult:
    """Greedy soup (Wortsman et al. 2022): walk the candidates best first, keep each one whose addition
    to the uniform soup improves the selection-split overall."""
    if not ranked:
        raise SelectionError("greedy soup needs at least one candidate")
    kept = [ranked[0]]
    first = evaluate({ranked[0]: 1.0})
    best = objective_of(first)
    rows = [{"point": 0, "added": ranked[0], "kept": True, **first, "overall": best}]
    best_scores = first
    for i, cand in enumerate(ranked[1:], start=1):
        trial = kept + [cand]
        cs = evaluate({n: 1 / len(trial) for n in trial})
        score = objective_of(cs)
        keep = score > best
        rows.append({"point": i, "added": cand, "kept": keep, **cs, "overall": score})
        if keep:
            kept, best, best_scores = trial, score, cs
    return SearchResult({n: 1 / len(kept) for n in kept}, {**best_scores, "overall": best}, pd.DataFrame(rows))
