"""Racing weight points on shared items: the grid's best soup for a fraction of its evaluations.

Every point is scored on the SAME stratified item subset of the selection split (paired comparisons);
points whose paired difference to the current leader is confidently negative are dropped; the survivors
get a larger subset (the earlier one plus new items: nested, so only new items are evaluated); at the end
the finalists are scored on the whole selection split and the best is kept. Pure: points are indices and
``score_items(point, items)`` returns per-item scores; nothing here knows models or caches.

**Objective.** ``overall = sum_c a_c * mean_c`` (the mean of category means by default: ``a_c = 1/K``), so an
item of category c weighs ``a_c / n_c``. On a subset S the estimate is ``sum_c a_c * mean over S_c``.

**Subsets.** Per category, items are ordered by ``sha256(seed, category, item id)``; round r takes the first
``m_c(r) = ceil(f_r * n_c)`` of them (at least ``min_items``), ``f_r = start * growth**r`` up to 1 (the
last round is the whole split). Stratified with proportional allocation, deterministic for a seed.

**Rule (paired z race, Bonferroni).** In round r, for each surviving point p and the leader l (best
estimate; ties: the earlier point) let d_i = y_p,i - y_l,i on S(r). ``D = sum_c a_c mean_c(d)`` with
``se^2 = sum_c a_c^2 (1 - m_c/n_c) s_c^2 / m_c`` (sampling without replacement from the finite selection
split, so the target is exactly the full-split score; ``s_c^2``: sample variance of d in category c, floored
at ``1/m_c``, as if at least one item disagreed, so that a few agreeing items never look certain).
p is dropped when ``D + z se < 0`` with ``z = Phi^-1(1 - delta / ((P - 1) R))``: P points, R elimination
rounds. Under the normal approximation, the probability that the selection split's best point is ever
dropped is at most ``delta`` (a union bound over its P - 1 rivals and R rounds).

**Halving (budget, no guarantee).** After the bound, only the best ``keep`` share of the survivors by
estimate (at least ``finalists``) goes on to the next round: successive halving, which spends the budget on
the promising points. Its cuts carry no error level (a cut point may be the best); on the demo the bound
alone rarely drops a point before the budget is spent (1,600 items; neighbouring soups differ by a few items).

**Finals and budget.** When at most ``finalists`` points survive, or the next round is the whole split, or
it would break the budget (counting the ``finalists`` full evaluations it must still reserve), the best
survivors by their last estimate are scored on the whole split (all of them without a budget; with one, as
many as it still affords: at least ``finalists``, or as many as the budget allowed after the first round) and
the best of them is chosen. Costs are in items (the
budget in full-split equivalents: ``budget * n`` items, n = all selection items); the rule never spends more
than the budget, and refuses one smaller than its first round plus one full evaluation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from soce.method import SelectionError

ItemScores = dict[str, dict[str, float]]  # {category: {item_id: score}}
ScoreItems = Callable[[int, dict[str, list[str]]], ItemScores]  # (point index, items) -> per-item scores


@dataclass(frozen=True)
class RaceSettings:
    """The racing rule's knobs (see the module docstring). ``budget`` in full selection-split equivalents."""

    delta: float = 0.05  # family-wise error: chance that the full-split best point is dropped
    start: float = 0.05  # first subset: this fraction of each category's items
    growth: float = 2.0  # subset size factor from one round to the next
    finalists: int = 5  # points scored on the whole selection split at the end (fewer if the budget is smaller)
    min_items: int = 2  # per category in the first subset
    seed: int = 0  # which items go first
    keep: float = 0.5  # share of survivors (best estimates) kept after each round (halving); 1: the bound alone
    budget: float | None = None  # most full-split equivalents to spend (None: no cap)

    def check(self) -> None:
        """Raise SelectionError (one line) on a value the rule cannot use."""
        problems = [
            (not 0 < self.delta < 1, f"search.race_delta must be in (0, 1), got {self.delta}"),
            (not 0 < self.start <= 1, f"search.race_start must be in (0, 1], got {self.start}"),
            (not self.growth > 1, f"search.race_growth must be > 1, got {self.growth}"),
            (self.finalists < 1, f"search.race_finalists must be >= 1, got {self.finalists}"),
            (self.min_items < 2, f"race min_items must be >= 2, got {self.min_items}"),
            (not 0 < self.keep <= 1, f"search.race_keep must be in (0, 1], got {self.keep}"),
            (
                self.budget is not None and not self.budget > 0,
                f"search.budget must be > 0 full selection-split evaluations, got {self.budget}",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise SelectionError(message)


@dataclass
class RaceOutcome:
    """The chosen point, its whole-selection-split scores, and what the race spent (in items)."""

    best: int
    scores: dict[str, float]  # category means over the whole selection split + "overall"
    points: list[dict]  # per point: items, rounds reached, round dropped (or None), last estimate, full overall
    rounds: list[dict] = field(default_factory=list)  # per round: fraction, alive, dropped, items spent so far
    items_evaluated: int = 0  # items scored over all points (a fresh run's cost)
    full_items: int = 0  # items in the whole selection split (one full-split equivalent)

    @property
    def full_split_equivalents(self) -> float:
        return self.items_evaluated / self.full_items


def item_order(item_ids: dict[str, list[str]], seed: int) -> dict[str, list[str]]:
    """Each category's items in the race's deterministic order (a seeded hash of category and id)."""

    def rank(c: str, i: str) -> str:
        return hashlib.sha256(f"{seed}\0{c}\0{i}".encode()).hexdigest()

    return {c: sorted(dict.fromkeys(map(str, ids)), key=lambda i, c=c: rank(c, i)) for c, ids in item_ids.items()}


def schedule(sizes: dict[str, int], start: float, growth: float, min_items: int = 2) -> list[dict[str, int]]:
    """Items per category in each round: ``ceil(f * n_c)`` for f = start, start*growth, ... up to the whole split
    (the last round); at least ``min_items`` (or all of a smaller category); rounds that add nothing are merged."""
    rounds: list[dict[str, int]] = []
    f = start
    while True:
        m = {c: min(n, max(min_items, math.ceil(f * n - 1e-9))) for c, n in sizes.items()}
        if not rounds or m != rounds[-1]:
            rounds.append(m)
        if f >= 1 or m == sizes:
            break
        f = min(1.0, f * growth)
    if rounds[-1] != sizes:
        rounds.append(dict(sizes))
    return rounds


def first_subset(item_ids: dict[str, list[str]], settings: RaceSettings) -> dict[str, list[str]]:
    """The items of the race's first round (what every point is scored on first)."""
    order = item_order({c: ids for c, ids in item_ids.items() if ids}, settings.seed)
    m = schedule({c: len(v) for c, v in order.items()}, settings.start, settings.growth, settings.min_items)[0]
    return {c: order[c][: m[c]] for c in order}


def objective_weights(categories: Sequence[str], weights: dict[str, float] | None = None) -> dict[str, float]:
    """The coefficients ``a_c`` of the objective (default: the mean of categories, 1/K each)."""
    if weights is None:
        return {c: 1.0 / len(categories) for c in categories}
    missing = [c for c in categories if c not in weights]
    if missing:
        raise SelectionError(f"objective weights have no coefficient for category {missing[0]!r}")
    return {c: float(weights[c]) for c in categories}


def estimate(y: dict[str, np.ndarray], a: dict[str, float]) -> float:
    """The objective's estimate from per-item scores ``y[c]`` (the items of a subset)."""
    return float(sum(a[c] * y[c].mean() for c in a if len(y[c])))


def paired_bound(d: dict[str, np.ndarray], a: dict[str, float], n: dict[str, int]) -> tuple[float, float]:
    """(D, se) of a paired difference: the objective's estimate of ``d`` and its standard error (finite-population
    corrected, each category's variance floored at 1/m_c)."""
    diff, var = 0.0, 0.0
    for c, x in d.items():
        m = len(x)
        if not m:
            continue
        diff += a[c] * float(x.mean())
        s2 = float(x.var(ddof=1)) if m > 1 else 0.0
        var += a[c] ** 2 * (1 - m / n[c]) * max(s2, 1.0 / m) / m
    return diff, math.sqrt(max(var, 0.0))


def z_level(delta: float, n_points: int, n_rounds: int) -> float:
    """The one-sided normal quantile of the Bonferroni-corrected level ``delta / ((P - 1) R)``."""
    return NormalDist().inv_cdf(1 - delta / (max(1, n_points - 1) * max(1, n_rounds)))


def race(
    n_points: int,
    item_ids: dict[str, list[str]],
    score_items: ScoreItems,
    settings: RaceSettings,
    category_weights: dict[str, float] | None = None,
) -> RaceOutcome:
    """Race points ``0..n_points-1`` on the selection split's items (module docstring); return the winner."""
    settings.check()
    if n_points < 1:
        raise SelectionError("the race has no points to evaluate")
    cats = [c for c in item_ids if item_ids[c]]
    if not cats:
        raise SelectionError("the race needs selection-split items; the split has none")
    state = _Race(
        n_points, {c: item_ids[c] for c in cats}, score_items, settings, objective_weights(cats, category_weights)
    )
    return state.run()


@dataclass
class _Race:
    n_points: int
    item_ids: dict[str, list[str]]
    score_items: ScoreItems
    settings: RaceSettings
    a: dict[str, float]
    y: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # point -> category -> item -> score
    spent: int = 0
    rounds: list[dict] = field(default_factory=list)
    dropped: dict[int, int] = field(default_factory=dict)  # point -> round (1-based) it was dropped in

    def __post_init__(self) -> None:
        self.order = item_order(self.item_ids, self.settings.seed)
        self.n = {c: len(ids) for c, ids in self.order.items()}
        self.total = sum(self.n.values())
        s = self.settings
        self.plan = schedule(self.n, s.start, s.growth, s.min_items)
        self.z = z_level(s.delta, self.n_points, len(self.plan) - 1)
        self.cap = None if s.budget is None else math.floor(s.budget * self.total + 1e-9)
        first = sum(self.plan[0].values())
        least = (
            self.n_points * self.total
            if self.n_points <= s.finalists or len(self.plan) == 1
            else self.n_points * first + self.total - first
        )
        rest = self.total - first
        self.k_max = (
            self.n_points if self.cap is None or not rest else max(1, (self.cap - self.n_points * first) // rest)
        )  # finalists the budget allows
        if self.cap is not None and least > self.cap:
            raise SelectionError(
                f"search.budget={s.budget} full selection-split evaluations is below the race's minimum "
                f"{least / self.total:.2f} for {self.n_points} points ({100 * s.start:g}% of the items each, then "
                f"one finalist on the rest); raise search.budget or lower search.race_start"
            )

    def run(self) -> RaceOutcome:
        alive = list(range(self.n_points))
        for r, m in enumerate(self.plan):
            last = r == len(self.plan) - 1 or len(alive) <= self.settings.finalists or len(alive) == 1
            if not last and not self._affordable(alive, r):
                last = True
            if last:
                return self._finals(alive, r)
            self._evaluate(alive, m)
            alive = self._eliminate(alive, m, r)
        raise AssertionError("the last round always ends the race")  # pragma: no cover

    def _subset(self, m: dict[str, int]) -> dict[str, list[str]]:
        return {c: self.order[c][: m[c]] for c in self.order}

    def _evaluate(self, points: list[int], m: dict[str, int]) -> None:
        """Score ``points`` on the subset of sizes ``m``, asking only for the items each one lacks."""
        for p in points:
            have = self.y.setdefault(p, {c: {} for c in self.order})
            new = {c: [i for i in ids if i not in have[c]] for c, ids in self._subset(m).items()}
            new = {c: ids for c, ids in new.items() if ids}
            if not new:
                continue
            got = self.score_items(p, new)
            for c, ids in new.items():
                for i in ids:
                    try:
                        have[c][i] = float(got[c][i])
                    except (KeyError, TypeError):
                        raise SelectionError(
                            f"point {p}: item evaluation returned no score for item {i!r} of category {c!r}"
                        ) from None
            self.spent += sum(len(ids) for ids in new.values())

    def _scores(self, p: int, m: dict[str, int]) -> dict[str, np.ndarray]:
        return {c: np.array([self.y[p][c][i] for i in ids]) for c, ids in self._subset(m).items()}

    def _eliminate(self, alive: list[int], m: dict[str, int], r: int) -> list[int]:
        ys = {p: self._scores(p, m) for p in alive}
        est = {p: estimate(ys[p], self.a) for p in alive}
        leader = min(alive, key=lambda p: (-est[p], p))
        keep = []
        for p in alive:
            diff, se = paired_bound({c: ys[p][c] - ys[leader][c] for c in self.order}, self.a, self.n)
            if p == leader or diff + self.z * se >= 0:
                keep.append(p)
            else:
                self.dropped[p] = r + 1
        if self.settings.keep < 1:  # successive halving on top of the bound: keep the best share by estimate
            n_keep = max(self.settings.finalists, math.ceil(self.settings.keep * len(alive)))
            cut = sorted(keep, key=lambda p: (-est[p], p))[n_keep:]
            for p in cut:
                self.dropped[p] = r + 1
            keep = [p for p in keep if p not in set(cut)]
        self.rounds.append(
            {
                "round": r + 1,
                "items_per_point": sum(m.values()),
                "fraction": sum(m.values()) / self.total,
                "alive": len(alive),
                "dropped": len(alive) - len(keep),
                "leader": leader,
                "leader_estimate": est[leader],
                "items_spent": self.spent,
            }
        )
        return keep

    def _affordable(self, alive: list[int], r: int) -> bool:
        """Whether round r and the finals it would still owe fit in the budget."""
        if self.cap is None:
            return True
        now = sum(self.plan[r].values())
        before = sum(self.plan[r - 1].values()) if r else 0
        finals = min(self.settings.finalists, len(alive), self.k_max) * (self.total - now)
        return self.spent + len(alive) * (now - before) + finals <= self.cap

    def _finals(self, alive: list[int], r: int) -> RaceOutcome:
        """Score the best survivors (by their last estimate) on the whole split and keep the best: all of them
        without a budget, else as many as the budget still affords (the reserve guarantees ``finalists``, or
        as many as the budget allowed at the start)."""
        if r:
            m = self.plan[r - 1]
            est = {p: estimate(self._scores(p, m), self.a) for p in alive}
            alive = sorted(alive, key=lambda p: (-est[p], p))
        rest = self.total - (sum(self.plan[r - 1].values()) if r else 0)
        room = len(alive) if self.cap is None else (self.cap - self.spent) // rest
        finalists = sorted(alive[: max(1, min(len(alive), room))])  # room >= the finalists reserved
        full = self.plan[-1]
        self._evaluate(finalists, full)
        ys = {p: self._scores(p, full) for p in finalists}
        overall = {p: estimate(ys[p], self.a) for p in finalists}
        best = min(finalists, key=lambda p: (-overall[p], p))
        self.rounds.append(
            {
                "round": r + 1,
                "items_per_point": self.total,
                "fraction": 1.0,
                "alive": len(finalists),
                "dropped": len(finalists) - 1,
                "leader": best,
                "leader_estimate": overall[best],
                "items_spent": self.spent,
                "finals": True,
            }
        )
        scores = {c: float(ys[best][c].mean()) for c in self.order}
        return RaceOutcome(
            best, {**scores, "overall": overall[best]}, self._table(overall), self.rounds, self.spent, self.total
        )

    def _table(self, full: dict[int, float]) -> list[dict]:
        rows = []
        for p in range(self.n_points):
            have = self.y.get(p, {})
            n = sum(len(v) for v in have.values())
            reached = next((k + 1 for k, m in enumerate(self.plan) if sum(m.values()) >= n), 0) if n else 0
            sub = {c: np.array(list(have[c].values())) for c in have} if n else {}
            rows.append(
                {
                    "point": p,
                    "items": n,
                    "rounds": reached,
                    "dropped_in_round": self.dropped.get(p),
                    "estimate": estimate(sub, self.a) if n else float("nan"),
                    "full_overall": full.get(p, float("nan")),
                }
            )
        return rows
