"""Selections (Algorithm 1, steps 1-2): correlate categories across the population, pick the experts.

Each is a small function registered by name (``@selection("name")``), one per ``conf/selection/`` option;
``selection.method`` picks it. It returns the weak set (or category groups) and their experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from soce import method
from soce.config import SelectionConfig


@dataclass
class Selection:
    """Algorithm 1 steps 1-2 on the selection split: correlation, L, experts (logged by every strategy)."""

    correlation: pd.DataFrame
    weak: list[str]
    experts: dict[str, str]  # category in L (or category group) -> its expert
    ingredients: list[str]  # distinct experts, candidate order, at most ``cap``
    cap: int | None = None  # selection.max_experts

    @property
    def kept(self) -> dict[str, str]:
        """category -> expert, for the experts that are ingredients."""
        return {c: m for c, m in self.experts.items() if m in self.ingredients}

    @property
    def dropped(self) -> dict[str, str]:
        """category -> expert, for the experts that ``cap`` left out of the soup."""
        return {c: m for c, m in self.experts.items() if m not in self.ingredients}

    def describe(self) -> str:
        """One line: L, the kept experts, and those dropped by the cap (named with it)."""
        line = f"L = {', '.join(self.weak) or '(empty)'}; experts: {_pairs(self.kept)}"
        if self.dropped:
            line += f"; dropped by selection.max_experts={self.cap}: {_pairs(self.dropped)}"
        return line


def _pairs(experts: dict[str, str]) -> str:
    return ", ".join(f"{c} -> {m}" for c, m in experts.items()) or "(none)"


SelectFn = Callable[[pd.DataFrame, pd.DataFrame, SelectionConfig], tuple[list[str], dict[str, str]]]
SELECTIONS: dict[str, SelectFn] = {}


def selection(name: str) -> Callable[[SelectFn], SelectFn]:
    """Register ``fn(correlation, candidates, config) -> (weak set, {category: expert})`` as ``name``."""

    def register(fn: SelectFn) -> SelectFn:
        SELECTIONS[name] = fn
        return fn

    return register


@selection("threshold")
def threshold(corr: pd.DataFrame, candidates: pd.DataFrame, cfg: SelectionConfig) -> tuple[list[str], dict]:
    """The paper's weak set L: categories with |rho| < tau to at least one other; the best candidate of each."""
    weak = method.weak_categories(corr, cfg.tau)
    return weak, method.select_experts(candidates, weak, cfg.tie_break)


@selection("cluster")
def cluster(corr: pd.DataFrame, candidates: pd.DataFrame, cfg: SelectionConfig) -> tuple[list[str], dict]:
    """Average-linkage clusters of categories on 1 - |rho|; one expert per cluster."""
    clusters = method.category_clusters(corr, cfg.tau)
    if len(clusters) < 2:  # one cluster: no weak structure, the best single candidate (as threshold's empty L)
        return [], method.cluster_experts(candidates, [], cfg.tie_break)
    return ["+".join(c) for c in clusters], method.cluster_experts(candidates, clusters, cfg.tie_break)


def select(population: pd.DataFrame, candidates: pd.DataFrame, cfg: SelectionConfig) -> Selection:
    """Correlate the categories across ``population`` and apply the configured selection to ``candidates``."""
    if cfg.method not in SELECTIONS:
        raise method.SelectionError(f"unknown selection.method {cfg.method!r}; available: {', '.join(SELECTIONS)}")
    corr = method.category_correlation(population)
    weak, experts = SELECTIONS[cfg.method](corr, candidates, cfg)
    return Selection(
        corr, weak, experts, method.distinct_experts(experts, candidates, cfg.max_experts), cfg.max_experts
    )
