"""The evaluation cache and the MLflow layer, against a real sqlite store; the report's table of runs."""

import json

import pandas as pd
import pytest

from soce.scores import ScoreCache, model_fingerprint, score_table, write_json_atomic
from soce.tracking import JobTracker, ensure_experiment, start_run


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


def test_job_tracker_nested_points(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "soce-test", str(tmp_path / "art"))
    assert ensure_experiment(uri, "soce-test") == exp
    parent = start_run(uri, exp, "sweep", tags={"soce.kind": "sweep"})
    job = JobTracker.start(uri, "soce-test", None, "soce_weighted", parent, {"soce.kind": "job"})
    job.log({"strategy": "soce_weighted", "w.m1": 0.7}, {"test.overall": 0.5})
    for i in range(3):
        job.log_point(i, {"m1": 0.1 * (i + 1), "m2": 1 - 0.1 * (i + 1)}, {"a": 0.1 * i, "overall": 0.1 * i}, "dev")
    (tmp_path / "x.csv").write_text("a\n1\n")
    job.log_artifact(tmp_path / "x.csv")
    job.end()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs([exp])
    points = runs[runs["tags.soce.kind"] == "search_point"]
    assert len(points) == 3 and set(points["tags.mlflow.parentRunId"]) == {job.run_id}
    jobrow = runs[runs["run_id"] == job.run_id].iloc[0]
    assert jobrow["tags.mlflow.parentRunId"] == parent and jobrow["status"] == "FINISHED"
    assert jobrow["metrics.test.overall"] == 0.5 and jobrow["params.w.m1"] == "0.7"
    assert [a.path for a in mlflow.MlflowClient(uri).list_artifacts(job.run_id)] == ["x.csv"]


def test_comparison_table_leaves_out_unfinished_jobs():
    from soce.report import comparison_table, unscored_jobs

    nan = float("nan")
    jobs = pd.DataFrame({
        "run_id": ["r1", "r2", "r3"], "status": ["FINISHED", "RUNNING", "FINISHED"],
        "start_time": [1, 2, 3], "params.strategy": ["uniform", nan, "soce_selected"],
        "params.categories": ["a,b"] * 3, "params.best_single": ["m1"] * 3,
        "metrics.test.a": [0.5, nan, 0.7], "metrics.test.b": [0.3, nan, 0.5],
        "metrics.test.overall": [0.4, nan, 0.6],
        "metrics.best_single.test.a": [0.6] * 3, "metrics.best_single.test.b": [0.2] * 3,
        "metrics.best_single.test.overall": [0.4] * 3,
    })
    table = comparison_table(jobs, "test")
    assert list(table.index) == ["uniform", "soce_selected", "best single (m1)"]
    assert table.loc["soce_selected", "overall"] == 60.0
    assert list(unscored_jobs(jobs, "test")["run_id"]) == ["r2"]
    with pytest.raises(LookupError, match="no job of the sweep has scores"):
        comparison_table(jobs.iloc[[1]], "test")


def test_report_cli_rejects_bad_arguments_without_creating_a_store(tmp_path, capsys):
    from soce.report import main

    assert main([f"root={tmp_path}", "expermient=x"]) == 2
    assert "soce.report: error: unknown argument 'expermient=x'" in capsys.readouterr().err
    assert main([f"root={tmp_path}"]) == 2
    assert "soce.report: error: no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()
    assert main(["--help"]) == 0 and "usage:" in capsys.readouterr().out


def test_report_reads_the_latest_sweep_that_has_jobs(tmp_path):
    """A sweep whose jobs never started (it failed first) must not hide the previous one."""
    import time

    from soce.report import sweep_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "soce-test", str(tmp_path / "art"))
    good = start_run(uri, exp, "sweep 1", tags={"soce.kind": "sweep"})
    start_run(uri, exp, "job", good, {"soce.kind": "job"})
    time.sleep(0.05)  # start_time has millisecond resolution
    empty = start_run(uri, exp, "sweep 2", tags={"soce.kind": "sweep"})
    assert sweep_runs(uri, "soce-test")[0] == good
    parent, jobs = sweep_runs(uri, "soce-test", parent=empty)
    assert parent == empty and jobs.empty
