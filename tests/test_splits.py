"""Held-out means disjoint items: select and report splits compared item by item, carved or refused."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from soce.benchmarks.lmeval import Evaluator
from soce.benchmarks.splits import check_splits
from soce.config import BenchmarkConfig, ConfigError, HoldoutConfig

ROOT = Path(__file__).resolve().parents[1]
CATS = ["mirror", "times4", "swap"]


@pytest.fixture
def own(monkeypatch):
    """The README's own benchmark (examples/own_benchmark): dev/test tasks, or one split (test only)."""
    monkeypatch.chdir(ROOT)  # its data_files are relative to the repo root

    def make(task: str = "own_{category}_{split}", **kw) -> BenchmarkConfig:
        return BenchmarkConfig(name="own", categories=CATS, task=task, task_dir="examples/own_benchmark/tasks", **kw)

    return make


def test_disjoint_splits_are_used_as_they_are(own):
    b = own()
    ev = Evaluator(b)
    got, check = check_splits(b, ev)
    assert got is b and check.mode == "disjoint" and check.shared == dict.fromkeys(CATS, 0)
    assert check.select == dict.fromkeys(CATS, 20) and check.report == dict.fromkeys(CATS, 30)
    assert "no item in both" in check.statement()


def test_one_split_is_carved_into_disjoint_halves_with_one_warning(own, caplog):
    b = own("own_{category}_test")  # dev and test read the same task
    ev = Evaluator(b)
    with caplog.at_level(logging.WARNING, logger="soce.benchmarks.splits"):
        got, check = check_splits(b, ev)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "share 90 items" in warnings[0].getMessage()
    assert "carving disjoint halves of 'test'" in warnings[0].getMessage()
    assert got.holdout == HoldoutConfig(split="test") and ev.benchmark is got and check.mode == "carved"
    sel, rep = ev.item_ids("dev"), ev.item_ids("test")
    for c in CATS:  # stratified: each category split in two disjoint halves covering its items
        assert not set(sel[c]) & set(rep[c]) and len(sel[c]) + len(rep[c]) == 30 and len(sel[c]) == 15
    assert check.to_json()["statement"].startswith("selected on 45 items and reported on 45 other items")
    assert Evaluator(got).item_ids("dev") == sel  # seeded: the same halves every time


def test_strict_splits_refuses_overlapping_splits_in_one_line(own):
    b = own("own_{category}_test", strict_splits=True)
    with pytest.raises(ConfigError) as e:
        check_splits(b, Evaluator(b))
    line = str(e.value)
    assert "\n" not in line and "select_split 'dev' and report_split 'test' share 90 items" in line
    assert "benchmark.holdout.split=test" in line


def test_same_split_names_keep_the_papers_protocol(own):
    b = own(select_split="test")
    got, check = check_splits(b, Evaluator(b))
    assert got is b and check.mode == "same_split" and "optimistic" in check.statement()


def test_explicit_holdout_is_kept(own):
    b = own("own_{category}_test", select_split="select", report_split="report", holdout=HoldoutConfig(split="test"))
    got, check = check_splits(b, Evaluator(b))
    assert got is b and check.mode == "holdout" and sum(check.select.values()) + sum(check.report.values()) == 90


@dataclass
class ById:
    """A backend that knows items by id only (as BFCL): one data set whatever the split's name."""

    benchmark: BenchmarkConfig
    ids: dict = field(default_factory=lambda: {"x": [f"x{i}" for i in range(10)]})

    def item_ids(self, split):
        from soce.benchmarks.holdout import carve, side

        b = self.benchmark
        if not b.holdout.split:
            return self.ids
        return carve(self.ids, b.holdout.select_fraction, b.holdout.seed)[side(b.select_split, b.report_split, split)]


def test_backends_without_content_keys_are_compared_by_id():
    b = BenchmarkConfig(name="b", categories=["x"], backend="bfcl")
    got, check = check_splits(b, ById(b))
    assert check.mode == "carved" and check.select == {"x": 5} and check.report == {"x": 5}


def test_items_are_compared_by_content_not_by_id():
    from soce.benchmarks.lmeval import content_key

    a = {"id": "dev-3", "prompt": "rev ab=", "target": "ba"}
    assert content_key(a) == content_key({**a, "id": "test-9"}) == content_key({**a, "question_id": 7})
    assert content_key(a) != content_key({**a, "target": "ab"})
