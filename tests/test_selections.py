"""soce.search.selections: the registry of selections (threshold weak set, clusters) over a real correlation."""

import numpy as np
import pandas as pd
import pytest

from soce import method
from soce.config import SelectionConfig
from soce.search.selections import SELECTIONS, select


@pytest.fixture
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0.2, 0.6, 40), rng.uniform(0.2, 0.6, 40)
    pop = pd.DataFrame({"a1": x, "a2": x + 0.01 * rng.normal(size=40), "b1": y, "b2": y + 0.01 * rng.normal(size=40)})
    cands = pd.DataFrame(
        {"a1": [0.9, 0.1, 0.2], "a2": [0.8, 0.2, 0.1], "b1": [0.1, 0.9, 0.3], "b2": [0.2, 0.7, 0.9]},
        index=["ma", "mb", "mc"],
    )
    return pop, cands


def test_threshold_is_the_paper_weak_set(tables):
    pop, cands = tables
    sel = select(pop, cands, SelectionConfig(method="threshold", tau=0.5))
    assert sel.weak == ["a1", "a2", "b1", "b2"] and sel.experts["b2"] == "mc"
    assert sel.ingredients == ["ma", "mb", "mc"]
    assert select(pop, cands, SelectionConfig(method="threshold", tau=0.5, max_experts=2)).ingredients == ["ma", "mb"]


def test_cluster_gives_one_expert_per_family(tables):
    pop, cands = tables
    sel = select(pop, cands, SelectionConfig(method="cluster", tau=0.5))
    assert sorted(sel.weak) == ["a1+a2", "b1+b2"]
    assert sel.experts == {"a1+a2": "ma", "b1+b2": "mb"}


def test_one_cluster_falls_back_to_the_best_single(tables):
    pop, cands = tables
    sel = select(pop, cands, SelectionConfig(method="cluster", tau=0.0))
    assert sel.weak == [] and len(sel.ingredients) == 1


def test_unknown_method_is_one_line(tables):
    assert set(SELECTIONS) == {"threshold", "cluster"}
    with pytest.raises(method.SelectionError, match="unknown selection.method 'x'"):
        select(*tables, SelectionConfig(method="x"))
