"""soce.search.evaluator.SoupEvaluator: the in-memory merge evaluator over a real demo zoo, lm-eval and the cache."""

import dataclasses

import pytest

from soce.benchmarks.lmeval import Benchmark, Evaluator
from soce.benchmarks.scores import ScoreCache
from soce.config import DemoConfig, HoldoutConfig
from soce.demo.zoo import build_demo
from soce.search.evaluator import SoupEvaluator


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    return build_demo(DemoConfig(seed=0, preset="tiny", root=str(tmp_path_factory.mktemp("zoo"))), progress=False)


def make(zoo: dict, tmp_path, **bench) -> SoupEvaluator:
    b = Benchmark(
        name="demo", categories=zoo["categories"][:3], task=zoo["task_template"], task_dir=zoo["task_dir"], **bench
    )
    return SoupEvaluator(
        dict(zoo["candidates"]), list(zoo["candidates"]), Evaluator(b, "cpu"), ScoreCache(tmp_path / "cache")
    )


def test_soups_are_cached_and_a_single_ingredient_equals_its_checkpoint(zoo, tmp_path):
    soups = make(zoo, tmp_path)
    a, b = list(zoo["candidates"])[:2]
    mixed = soups.scores({a: 0.6, b: 0.4}, "dev")
    assert soups.cache.evaluated == 1 and soups.timings
    assert soups.scores({a: 3.0, b: 2.0}, "dev") == mixed  # same normalised weights: served from the cache
    assert soups.cache.evaluated == 1 and soups.cache.cached == 1
    from_disk = soups.scores({a: 1.0}, "test")  # not resident: loaded from its checkpoint
    again = make(zoo, tmp_path / "fresh")
    again.scores({a: 0.5, b: 0.5}, "dev")  # a and b now resident in the Remixer
    assert again._remixer is not None and again.scores({a: 1.0, b: 0.0}, "test") == from_disk


def test_only_candidates_are_mixed(zoo, tmp_path):
    soups = make(zoo, tmp_path)
    soups.candidates = soups.candidates[:1]
    with pytest.raises(KeyError, match="not a candidate"):
        soups._remixer_for({list(zoo["candidates"])[1]: 0.5, soups.candidates[0]: 0.5})


def test_carved_halves_are_disjoint_and_scored_on_their_items(zoo, tmp_path):
    soups = make(
        zoo,
        tmp_path,
        select_split="select",
        report_split="report",
        holdout=HoldoutConfig(split="test", select_fraction=0.5, seed=0),
    )
    select, report = soups.item_ids("select"), soups.item_ids("report")
    for c in select:
        assert set(select[c]).isdisjoint(report[c]) and len(select[c]) + len(report[c]) == 60
    a = list(zoo["candidates"])[0]
    s = soups.scores({a: 1.0}, "select")
    assert [len(v) for v in s["samples"].values()] == [len(select[c]) for c in select]
    assert dataclasses.replace(soups.evaluator.benchmark).source_split("report") == "test"
