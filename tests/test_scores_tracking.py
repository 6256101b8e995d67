"""The evaluation cache, fingerprints and score tables (the MLflow layer: test_tracking.py, reports: test_report.py)."""

import json

import pytest

from soce.benchmarks.scores import ScoreCache, model_fingerprint, score_table
from soce.files import write_json_atomic


def test_cache_key_normalises_weights_and_ignores_zero(tmp_path):
    c = ScoreCache(tmp_path)
    fps = {"a": "fa", "b": "fb", "z": "fz"}
    k1 = c.key({"a": 0.3, "b": 0.7}, fps, {"split": "dev"})
    assert k1 == c.key({"b": 7, "a": 3, "z": 0.0}, fps, {"split": "dev"})
    assert k1 != c.key({"a": 0.4, "b": 0.6}, fps, {"split": "dev"})
    assert k1 != c.key({"a": 0.3, "b": 0.7}, fps, {"split": "test"})
    assert k1 != c.key({"a": 0.3, "b": 0.7}, {**fps, "a": "changed"}, {"split": "dev"})


def test_cache_computes_once_across_instances(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": 0.5}

    c1 = ScoreCache(tmp_path)
    assert c1.get_or_compute("k" * 32, compute) == {"x": 0.5}
    c2 = ScoreCache(tmp_path)
    assert c2.get_or_compute("k" * 32, compute) == {"x": 0.5}
    assert len(calls) == 1 and (c1.evaluated, c2.cached) == (1, 1)


def test_atomic_json_leaves_no_temp_files(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    f1 = model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    f2 = model_fingerprint(tmp_path)
    assert f2 != f1
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")  # the tokenizer changes what is scored
    assert model_fingerprint(tmp_path) != f2
    assert model_fingerprint("org/model-on-hub") == "hub:org/model-on-hub"


def test_score_table_adds_overall_and_checks_columns():
    t = score_table({"m1": {"a": 0.2, "b": 0.4}, "m2": {"a": 0.6, "b": 0.0}}, ["a", "b"])
    assert list(t.columns) == ["a", "b", "overall"] and t.loc["m1", "overall"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="'c'"):
        score_table({"m1": {"a": 0.2}}, ["a", "c"])
