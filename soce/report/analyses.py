"""Analyses of soups, as in the SoCE paper (arXiv 2511.13254, "Analyses in the paper"), model-free.

Every function here takes evaluations the caller has already made (or a callable that makes them) and
never loads a model:

* :func:`shapley_values` -- Shapley value of each soup ingredient, v(S) = score of the uniform soup of S;
* :func:`consistency` -- do category scores correlate more strongly across soups than across candidates?
* :func:`emergent_solves` / :func:`emergent_by_category` -- items no ingredient solves that the soup solves,
  and how many of each ingredient's solved items the soup keeps;

Scores are in whatever unit the caller uses (fractions or percent); results keep that unit. Their figures
are in :mod:`soce.report.plots`; a job runs them in :func:`soce.job.outputs.analyses`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

__all__ = [
    "ShapleyResult",
    "shapley_values",
    "ConsistencyResult",
    "consistency",
    "IngredientKept",
    "EmergentResult",
    "emergent_solves",
    "emergent_by_category",
]


# --------------------------------------------------------------------------------------------- Shapley


@dataclass(frozen=True)
class ShapleyResult:
    """Shapley values of the players, in the unit of ``value``.

    ``values[p]``: phi_p; their sum equals ``grand_value - empty_value`` (efficiency).
    ``method``: ``"exact"`` (all 2^n coalitions) or ``"sampled"`` (random permutations).
    ``evaluations``: distinct coalitions passed to ``value`` (the empty one is never passed).
    ``stderr``: standard error of each sampled phi_p (``None`` when exact; NaN with a single sample unit).
    ``n_permutations``: permutations actually used (0 when exact).
    """

    values: dict[str, float]
    method: Literal["exact", "sampled"]
    evaluations: int
    stderr: dict[str, float] | None
    n_permutations: int = 0
    empty_value: float = 0.0
    grand_value: float = math.nan

    def to_frame(self) -> pd.DataFrame:
        """One row per player, sorted by decreasing value: columns ``shapley`` and ``stderr`` (NaN if exact)."""
        se = self.stderr or {}
        df = pd.DataFrame(
            {"shapley": pd.Series(self.values, dtype=float), "stderr": pd.Series(se, dtype=float)},
            index=list(self.values),
        )
        df.index.name = "player"
        return df.sort_values("shapley", ascending=False)


class _Memo:
    """Memoised coalition values: the empty coalition is ``empty_value``, each other one is evaluated once."""

    def __init__(self, value: Callable[[frozenset[str]], float], empty_value: float):
        self._value = value
        self._cache: dict[frozenset[str], float] = {frozenset(): float(empty_value)}

    def __call__(self, coalition: frozenset[str]) -> float:
        got = self._cache.get(coalition)
        if got is None:
            got = float(self._value(coalition))
            self._cache[coalition] = got
        return got

    @property
    def evaluations(self) -> int:
        return len(self._cache) - 1


def shapley_values(
    players: Sequence[str],
    value: Callable[[frozenset[str]], float],
    empty_value: float = 0.0,
    exact_max: int = 8,
    n_permutations: int = 200,
    seed: int = 0,
    *,
    antithetic: bool = True,
    max_evaluations: int | None = None,
) -> ShapleyResult:
    """Shapley value of each player for the game ``value`` (v(S), e.g. the score of the uniform soup of S).

    ``value`` is called at most once per distinct non-empty coalition (memoised); v(empty) is ``empty_value``
    (e.g. 0, or the base model's score). With ``len(players) <= exact_max`` the values are exact (all 2^n - 1
    coalitions, Shapley weights |S|!(n-|S|-1)!/n!). Otherwise they are estimated from ``n_permutations``
    random orderings (seeded by ``seed``); with ``antithetic`` each ordering is paired with its reverse
    (``n_permutations`` is rounded up to even) and standard errors come from the pair means. Sampling stops
    early, after a whole ordering/pair, once ``max_evaluations`` distinct coalitions have been evaluated (so it
    may overshoot by up to 2n). Efficiency holds either way: sum(phi) = v(all) - v(empty), up to rounding.
    """
    names = [str(p) for p in players]
    if len(set(names)) != len(names):
        raise ValueError(f"players must be distinct, got {names}")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    memo = _Memo(value, empty_value)
    n = len(names)
    if n == 0:
        return ShapleyResult({}, "exact", 0, None, 0, float(empty_value), float(empty_value))
    if n <= exact_max:
        return _shapley_exact(names, memo)
    return _shapley_sampled(names, memo, n_permutations, seed, antithetic, max_evaluations)


def _shapley_exact(names: list[str], memo: _Memo) -> ShapleyResult:
    n = len(names)
    v = np.empty(1 << n)
    for mask in range(1 << n):
        v[mask] = memo(frozenset(names[i] for i in range(n) if mask >> i & 1))
    # weight of a coalition of size s not containing the player: s! (n - s - 1)! / n!
    w = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    phi = dict.fromkeys(names, 0.0)
    for i, name in enumerate(names):
        bit = 1 << i
        total = math.fsum(w[mask.bit_count()] * (v[mask | bit] - v[mask]) for mask in range(1 << n) if not mask & bit)
        phi[name] = total
    return ShapleyResult(phi, "exact", memo.evaluations, None, 0, float(v[0]), float(v[-1]))


def _shapley_sampled(
    names: list[str],
    memo: _Memo,
    n_permutations: int,
    seed: int,
    antithetic: bool,
    max_evaluations: int | None,
) -> ShapleyResult:
    n = len(names)
    rng = np.random.default_rng(seed)
    n_units = math.ceil(n_permutations / 2) if antithetic else n_permutations
    units: list[np.ndarray] = []  # one row of marginals (in ``names`` order) per unit: a pair mean or a permutation

    def marginals(order: np.ndarray) -> np.ndarray:
        out = np.empty(n)
        coalition: frozenset[str] = frozenset()
        prev = memo(coalition)
        for idx in order:
            coalition = coalition | {names[idx]}
            cur = memo(coalition)
            out[idx] = cur - prev
            prev = cur
        return out

    for _ in range(n_units):
        if max_evaluations is not None and units and memo.evaluations >= max_evaluations:
            break
        order = rng.permutation(n)
        m = marginals(order)
        units.append((m + marginals(order[::-1])) / 2 if antithetic else m)
    arr = np.vstack(units)
    k = len(units)
    phi = {name: float(arr[:, i].mean()) for i, name in enumerate(names)}
    if k > 1:
        se = {name: float(arr[:, i].std(ddof=1) / math.sqrt(k)) for i, name in enumerate(names)}
    else:
        se = dict.fromkeys(names, math.nan)
    grand = memo(frozenset(names))
    used = 2 * k if antithetic else k
    return ShapleyResult(phi, "sampled", memo.evaluations, se, used, memo(frozenset()), grand)


# ----------------------------------------------------------------------------------------- consistency


@dataclass(frozen=True)
class ConsistencyResult:
    """Category-by-category Pearson correlations across candidates and across soups.

    ``mean_r_*`` / ``mean_abs_r_*``: mean off-diagonal r / |r| (each unordered pair once), over the pairs of
    categories defined in BOTH matrices, so the two means compare the same pairs. ``excluded``: categories left
    out of the means because they have zero variance (or < 2 values) in either table. ``n_pairs``: pairs used.
    """

    corr_candidates: pd.DataFrame
    corr_soups: pd.DataFrame
    mean_r_candidates: float
    mean_r_soups: float
    mean_abs_r_candidates: float
    mean_abs_r_soups: float
    n_pairs: int
    excluded: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def delta(self) -> float:
        """mean_r_soups - mean_r_candidates: > 0 when soups are the more consistent population."""
        return self.mean_r_soups - self.mean_r_candidates

    @property
    def more_consistent(self) -> bool:
        """True when category scores correlate more strongly (higher mean r) across soups than candidates."""
        return bool(self.delta > 0)


def _degenerate(df: pd.DataFrame) -> list[str]:
    return [str(c) for c in df.columns if df[c].dropna().nunique() < 2]


def consistency(candidates: pd.DataFrame, soups: pd.DataFrame) -> ConsistencyResult:
    """Pearson correlation of category scores across candidates vs across soups (rows: models, cols: categories).

    Both tables must have the same category columns (order taken from ``candidates``) and >= 2 rows. Missing
    scores are dropped pairwise. Categories with zero variance in either table have undefined (NaN)
    correlations and are excluded from the means; ``notes`` says which.
    """
    if set(candidates.columns) != set(soups.columns):
        raise ValueError(
            f"candidates and soups must have the same categories: only in candidates "
            f"{sorted(map(str, set(candidates.columns) - set(soups.columns)))}, only in soups "
            f"{sorted(map(str, set(soups.columns) - set(candidates.columns)))}"
        )
    for name, df in (("candidates", candidates), ("soups", soups)):
        if len(df) < 2:
            raise ValueError(f"{name} needs >= 2 rows to correlate categories, got {len(df)}")
    cats = list(candidates.columns)
    if len(cats) < 2:
        raise ValueError(f"need >= 2 categories to correlate, got {cats}")
    cand = candidates[cats].astype(float)
    soup = soups[cats].astype(float)
    corr_c = cand.corr(method="pearson")
    corr_s = soup.corr(method="pearson")

    bad_c, bad_s = _degenerate(cand), _degenerate(soup)
    excluded = tuple(str(c) for c in cats if str(c) in set(bad_c) | set(bad_s))
    notes: list[str] = []
    if bad_c:
        notes.append(f"zero variance across candidates (excluded from the means): {', '.join(bad_c)}")
    if bad_s:
        notes.append(f"zero variance across soups (excluded from the means): {', '.join(bad_s)}")

    iu = np.triu_indices(len(cats), k=1)
    rc, rs = corr_c.to_numpy()[iu], corr_s.to_numpy()[iu]
    ok = np.isfinite(rc) & np.isfinite(rs)
    n_nan_other = int((~ok).sum()) - _pairs_touching(cats, set(excluded))
    if n_nan_other > 0:
        notes.append(f"{n_nan_other} other pair(s) without a defined correlation (too few shared rows) excluded")
    if not ok.any():
        notes.append("no pair of categories has a defined correlation in both tables: means are NaN")

    def mean(x: np.ndarray) -> float:
        return float(x[ok].mean()) if ok.any() else math.nan

    return ConsistencyResult(
        corr_candidates=corr_c,
        corr_soups=corr_s,
        mean_r_candidates=mean(rc),
        mean_r_soups=mean(rs),
        mean_abs_r_candidates=mean(np.abs(rc)),
        mean_abs_r_soups=mean(np.abs(rs)),
        n_pairs=int(ok.sum()),
        excluded=excluded,
        notes=tuple(notes),
    )


def _pairs_touching(cats: list, bad: set[str]) -> int:
    k = sum(str(c) in bad for c in cats)
    n = len(cats)
    return n * (n - 1) // 2 - (n - k) * (n - k - 1) // 2


# --------------------------------------------------------------------------------------- emergent solves


@dataclass(frozen=True)
class IngredientKept:
    """Of the items an ingredient solves (``n_solved``), those the soup solves too (``n_kept``), and the share."""

    n_solved: int
    n_kept: int
    share_kept: float  # n_kept / n_solved; NaN when the ingredient solves nothing


@dataclass(frozen=True)
class EmergentResult:
    """Emergent solves of a soup over its ingredients on one item set (counts of items; shares in [0, 1]).

    ``n_all_fail``: items every ingredient fails; ``n_soup_solves_all_fail``: of those, items the soup solves;
    ``share_emergent`` = their ratio (NaN when no item is failed by all). ``per_ingredient``: kept solves.
    """

    n_items: int
    n_all_fail: int
    n_soup_solves_all_fail: int
    share_emergent: float
    n_soup_solved: int
    per_ingredient: dict[str, IngredientKept]

    def to_frame(self) -> pd.DataFrame:
        """Tidy table, one row per ingredient (its kept solves), with the item-set summary repeated on each row."""
        rows = [
            {
                "ingredient": name,
                "n_solved": k.n_solved,
                "n_kept": k.n_kept,
                "share_kept": k.share_kept,
                "n_items": self.n_items,
                "n_soup_solved": self.n_soup_solved,
                "n_all_fail": self.n_all_fail,
                "n_soup_solves_all_fail": self.n_soup_solves_all_fail,
                "share_emergent": self.share_emergent,
            }
            for name, k in self.per_ingredient.items()
        ]
        return pd.DataFrame(rows)


def _as_correct(name: str, xs: Sequence[float | bool]) -> np.ndarray:
    arr = np.asarray(list(xs), dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name}: per-item correctness must be a flat sequence, got shape {arr.shape}")
    bad = ~np.isin(arr, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"{name}: per-item correctness must be 0/1 (or bool), got {arr[bad][:3].tolist()}")
    return arr.astype(bool)


def emergent_solves(ingredients: Mapping[str, Sequence[float | bool]], soup: Sequence[float | bool]) -> EmergentResult:
    """Items solved by the soup that every ingredient fails, and each ingredient's solved items the soup keeps.

    Each sequence is per-item correctness (1/0 or bool) over the same items in the same order. Raises
    ValueError if there is no ingredient, no item, a length differs, or a value is not 0/1.
    """
    if not ingredients:
        raise ValueError("emergent_solves needs at least one ingredient")
    s = _as_correct("soup", soup)
    if s.size == 0:
        raise ValueError("emergent_solves needs at least one item (the soup's sequence is empty)")
    ing = {str(k): _as_correct(str(k), v) for k, v in ingredients.items()}
    lengths = {k: a.size for k, a in ing.items() if a.size != s.size}
    if lengths:
        raise ValueError(f"per-item sequences must have the soup's length {s.size}; got {lengths}")
    all_fail = ~np.any(np.vstack(list(ing.values())), axis=0)
    n_all_fail = int(all_fail.sum())
    n_emergent = int((all_fail & s).sum())
    per = {}
    for k, a in ing.items():
        n_solved, n_kept = int(a.sum()), int((a & s).sum())
        per[k] = IngredientKept(n_solved, n_kept, n_kept / n_solved if n_solved else math.nan)
    return EmergentResult(
        n_items=int(s.size),
        n_all_fail=n_all_fail,
        n_soup_solves_all_fail=n_emergent,
        share_emergent=n_emergent / n_all_fail if n_all_fail else math.nan,
        n_soup_solved=int(s.sum()),
        per_ingredient=per,
    )


def emergent_by_category(
    ingredients: Mapping[str, Mapping[str, Sequence[float | bool]]],
    soup: Mapping[str, Sequence[float | bool]],
    pooled: str | None = "all",
) -> pd.DataFrame:
    """:func:`emergent_solves` per category: ``ingredients[category][name]`` and ``soup[category]`` are per-item
    correctness. Returns the concatenated tidy tables with a leading ``category`` column; when ``pooled`` is a
    name (default ``"all"``) a row set over all items of all categories is appended under that name (every
    category must then have the same ingredients). Raises ValueError if the categories differ.
    """
    if set(ingredients) != set(soup):
        raise ValueError(
            f"categories differ: ingredients {sorted(map(str, ingredients))} vs soup {sorted(map(str, soup))}"
        )
    if not soup:
        raise ValueError("emergent_by_category needs at least one category")
    frames = []
    for cat in soup:
        try:
            df = emergent_solves(ingredients[cat], soup[cat]).to_frame()
        except ValueError as e:
            raise ValueError(f"category {cat!r}: {e}") from None
        frames.append(df.assign(category=str(cat)))
    if pooled is not None:
        names = [set(ingredients[c]) for c in soup]
        if any(n != names[0] for n in names):
            raise ValueError("pooling needs the same ingredients in every category (pass pooled=None)")
        order = list(next(iter(ingredients.values())))
        all_ing = {k: [x for c in soup for x in ingredients[c][k]] for k in order}
        all_soup = [x for c in soup for x in soup[c]]
        frames.append(emergent_solves(all_ing, all_soup).to_frame().assign(category=pooled))
    out = pd.concat(frames, ignore_index=True)
    return out[["category", *[c for c in out.columns if c != "category"]]]
