"""Reports keyed by job: tables from result.json files and from MLflow, pivots, the answer line, the CLI."""

import json
import time

import pandas as pd
import pytest
import yaml

from soce.report.cli import main
from soce.report.tables import (
    comparison_from_results,
    comparison_table,
    distinct_soups,
    format_answer,
    load_results,
    orderings,
    pivot,
    selection_text,
    sweep_report,
    unscored_jobs,
    write_sweep_report,
)
from soce.tracking.numbers import fmt_pct
from soce.tracking.runs import PARENT_FILE, log_baselines, start_run
from soce.tracking.store import ensure_experiment

CATS = ["a", "b"]


def fake_result(strategy: str, tau: float, overall: float) -> dict:
    return {
        "strategy": strategy,
        "benchmark": "demo",
        "pool": "demo",
        "categories": CATS,
        "families": {},
        "select_split": "dev",
        "report_split": "test",
        "weak_set": ["a"],
        "expert_of": {"a": "m1"},
        "experts": ["m1"],
        "weights": {"m1": 0.5, "m2": 0.5},
        "correlation": {"a": {"a": 1.0, "b": 0.2}, "b": {"a": 0.2, "b": 1.0}},
        "scores": {
            "dev": {"a": overall, "b": overall, "overall": overall},
            "test": {"a": overall, "b": overall - 0.1, "overall": overall - 0.05},
        },
        "candidate_scores": {
            "m1": {"dev": {"a": 0.4, "b": 0.2, "overall": 0.3}, "test": {"a": 0.4, "b": 0.2, "overall": 0.3}},
            "m2": {"dev": {"a": 0.1, "b": 0.1, "overall": 0.1}, "test": {"a": 0.1, "b": 0.1, "overall": 0.1}},
        },
        "best_single": "m1",
        "mlflow_run_id": None,
    }


def fake_sweep(tmp_path, varying_in_marker: bool = True):
    """A 2 x 2 multirun dir (strategy x selection.tau) as Hydra and the pipeline leave it."""
    jobs = [
        ("uniform", 0.1, 0.40),
        ("uniform", 0.5, 0.41),
        ("soce_selected", 0.1, 0.50),
        ("soce_selected", 0.5, 0.15975),
    ]
    for i, (strategy, tau, overall) in enumerate(jobs):
        d = tmp_path / f"{i}_{strategy}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"strategy={strategy}", f"selection.tau={tau}", "debug=fast", "save_soup=false"])
        )
        (d / "result.json").write_text(json.dumps(fake_result(strategy, tau, overall)))
    if varying_in_marker:
        (tmp_path / PARENT_FILE).write_text(
            json.dumps(
                {"run_id": "r", "experiment_id": "1", "uri": "sqlite:///x", "varying": ["strategy", "selection.tau"]}
            )
        )
    return tmp_path


@pytest.mark.parametrize("marker", [True, False])
def test_results_table_has_one_row_per_job(tmp_path, marker):
    results = load_results(fake_sweep(tmp_path, marker))
    table = comparison_from_results(results, "test")
    assert list(table.index) == [
        "uniform tau=0.1",
        "uniform tau=0.5",
        "soce_selected tau=0.1",
        "soce_selected tau=0.5",
        "best single (m1)",
    ]
    assert table.loc["soce_selected tau=0.5", "a"] == 15.98  # one rounding: 0.15975 -> 15.98, as logged
    assert table.loc["uniform tau=0.5", "overall"] == 36.0
    assert results[0]["varying"] == ["strategy", "selection.tau"]


def test_sweep_report_files_name_every_job(tmp_path):
    sweep = fake_sweep(tmp_path)
    assert write_sweep_report(sweep) is not None
    csv = pd.read_csv(sweep / "comparison.csv", index_col=0)
    assert len(csv) == 5 and csv.index[3] == "soce_selected tau=0.5"
    md = (sweep / "report.md").read_text()
    assert "overrides that varied: `strategy`, `selection.tau`" in md
    for label in ("uniform tau=0.1", "soce_selected tau=0.5"):
        assert f"| {label} |" in md and f"- `{label}`: L = a" in md
    assert "soce_selected >= uniform (tau=0.1)" in md and "soce_selected >= uniform (tau=0.5)" in md
    assert (sweep / "scores.png").is_file() and (sweep / "weights.png").is_file()


def test_orderings_compare_within_groups():
    table = pd.DataFrame(
        {"overall": [40.0, 50.0, 45.0, 30.0, 42.0]},
        index=[
            "uniform tau=0.1",
            "soce_selected tau=0.1",
            "uniform tau=0.5",
            "soce_selected tau=0.5",
            "best single (m1)",
        ],
    )
    strategies = {lab: lab.split(" ")[0] for lab in table.index[:4]}
    got = {claim: (ok, m) for claim, ok, m in orderings(table, strategies)}
    assert got["soce_selected >= uniform (tau=0.1)"] == (True, 10.0)
    assert got["soce_selected >= uniform (tau=0.5)"] == (False, -15.0)
    assert got["best single > uniform (tau=0.5)"] == (False, -3.0)


def test_pivot_by_one_override(tmp_path):
    results = load_results(fake_sweep(tmp_path))
    table = comparison_from_results(results, "test")
    values = {r["label"]: "0.1" if "tau=0.1" in r["label"] else "0.5" for r in results}
    p = pivot(table, values, "selection.tau")
    assert list(p.columns) == ["tau=0.1", "tau=0.5"] and list(p.index) == ["uniform", "soce_selected"]
    assert p.loc["soce_selected", "tau=0.1"] == 45.0
    with pytest.raises(LookupError, match="by= takes a swept override"):
        pivot(table, {}, "selection.nope")


def test_report_cli_dir_and_by(tmp_path, capsys):
    sweep = fake_sweep(tmp_path / "sweep")
    assert main([f"dir={sweep}", "by=selection.tau", f"out={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    assert "varied: strategy, selection.tau" in out and "| soce_selected | 45.00 | 10.98 |" in out
    assert main([f"dir={sweep}"]) == 0
    assert "| soce_selected tau=0.5 | 15.98 | 5.98 | 10.98 |" in capsys.readouterr().out


def test_format_answer_prints_the_answer():
    r = fake_result("soce_selected", 0.1, 0.15975) | {
        "weak_set": ["x1", "y1"],
        "expert_of": {"x1": "a (FC)"},
        "weights": {"a (FC)": 0.5, "b": 0.5, "c": 0.0},
        "scores": {},
    }
    line = format_answer(r, "/out/result.json")
    assert line == (
        "soce_selected: L = x1, y1; experts: x1 -> a (FC); weights: a (FC) 0.50, b 0.50; result: /out/result.json"
    )
    r["scores"] = {"test": {"overall": 0.15975}}
    assert format_answer(r).startswith(f"soce_selected: test overall {fmt_pct(0.15975)}%; L = ")


def mlflow_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "soce-test", str(tmp_path / "art"))
    parent = start_run(uri, exp, "sweep", tags={"soce.kind": "sweep", "soce.varying": '["strategy"]'})
    return uri, exp, parent


def test_mlflow_table_keyed_by_label_with_baseline_runs(tmp_path):
    import mlflow

    uri, exp, parent = mlflow_sweep(tmp_path)
    from soce.tracking.store import log_values

    for i, tau in enumerate(("0.1", "0.5")):
        for strategy in ("uniform", "soce_selected"):
            lab = f"{strategy} tau={tau}"
            run = start_run(
                uri,
                exp,
                lab,
                parent,
                {"soce.kind": "job", "soce.label": lab, "soce.overrides": json.dumps({"selection.tau": tau})},
            )
            log_values(
                uri,
                run,
                {"strategy": strategy, "categories": "a,b"},
                {"test.a": 0.1 * (i + 1), "test.b": 0.2, "test.overall": 0.15 + i / 10},
            )
            time.sleep(0.01)
    log_baselines(uri, exp, parent, {"m1": {"test": {"a": 0.5, "b": 0.5, "overall": 0.5}}}, "m1")
    mlflow.set_tracking_uri(uri)
    jobs = mlflow.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`soce.kind` = 'job'")
    from soce.report.tables import baseline_runs

    table = comparison_table(jobs, "test", baseline_runs(uri, exp, parent))
    assert list(table.index) == [
        "uniform tau=0.1",
        "soce_selected tau=0.1",
        "uniform tau=0.5",
        "soce_selected tau=0.5",
        "best single (m1)",
    ]
    assert table.loc["soce_selected tau=0.5", "overall"] == 25.0 and table.loc["best single (m1)", "a"] == 50.0


def test_report_cli_from_mlflow_by_override(tmp_path, capsys):
    test_mlflow_table_keyed_by_label_with_baseline_runs(tmp_path)
    assert main([f"uri=sqlite:///{tmp_path / 'mlflow.db'}", "experiment=soce-test", "by=selection.tau"]) == 0
    out = capsys.readouterr().out
    assert "varied: strategy" in out and "| uniform | 15.00 | 25.00 |" in out


def test_comparison_table_leaves_out_unfinished_jobs():
    nan = float("nan")
    jobs = pd.DataFrame(
        {
            "run_id": ["r1", "r2", "r3"],
            "status": ["FINISHED", "RUNNING", "FINISHED"],
            "start_time": [1, 2, 3],
            "params.strategy": ["uniform", nan, "soce_selected"],
            "params.categories": ["a,b"] * 3,
            "params.best_single": ["m1"] * 3,
            "metrics.test.a": [0.5, nan, 0.7],
            "metrics.test.b": [0.3, nan, 0.5],
            "metrics.test.overall": [0.4, nan, 0.6],
            "metrics.best_single.test.a": [0.6] * 3,
            "metrics.best_single.test.b": [0.2] * 3,
            "metrics.best_single.test.overall": [0.4] * 3,
        }
    )
    table = comparison_table(jobs, "test")  # an older sweep: best single from the jobs' metrics
    assert list(table.index) == ["uniform", "soce_selected", "best single (m1)"]
    assert table.loc["soce_selected", "overall"] == 60.0
    assert list(unscored_jobs(jobs, "test")["run_id"]) == ["r2"]
    with pytest.raises(LookupError, match="no job of the sweep has scores"):
        comparison_table(jobs.iloc[[1]], "test")


def test_report_cli_rejects_bad_arguments_without_creating_a_store(tmp_path, capsys):
    assert main([f"root={tmp_path}", "expermient=x"]) == 2
    assert "soce.report: error: unknown argument 'expermient=x'" in capsys.readouterr().err
    assert main([f"root={tmp_path}"]) == 2
    assert "soce.report: error: no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()
    assert main(["--help"]) == 0 and "usage:" in capsys.readouterr().out


def test_report_reads_the_latest_sweep_that_has_jobs(tmp_path):
    """A sweep whose jobs never started (it failed first) must not hide the previous one."""
    from soce.report.tables import sweep_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "soce-test", str(tmp_path / "art"))
    good = start_run(uri, exp, "sweep 1", tags={"soce.kind": "sweep"})
    start_run(uri, exp, "job", good, {"soce.kind": "job"})
    time.sleep(0.05)  # start_time has millisecond resolution
    empty = start_run(uri, exp, "sweep 2", tags={"soce.kind": "sweep"})
    assert sweep_runs(uri, "soce-test")[0] == good
    parent, jobs = sweep_runs(uri, "soce-test", parent=empty)
    assert parent == empty and jobs.empty


def test_sweep_report_text_mentions_selection_per_job(tmp_path):
    results = load_results(fake_sweep(tmp_path))
    md = sweep_report(results, "test")
    assert md.count("- `") >= 4 and "4 jobs" in md


def test_jobs_that_made_one_soup_are_one_row(tmp_path):
    """uniform's soup does not depend on tau: same weights, same scores -> one row, labelled with both values."""
    sweep = fake_sweep(tmp_path)
    r1 = json.loads((sweep / "1_uniform" / "result.json").read_text())
    r1["scores"] = json.loads((sweep / "0_uniform" / "result.json").read_text())["scores"]
    (sweep / "1_uniform" / "result.json").write_text(json.dumps(r1))
    kept = distinct_soups(load_results(sweep))
    assert [r["label"] for r in kept] == ["uniform tau=0.1,0.5", "soce_selected tau=0.1", "soce_selected tau=0.5"]
    assert kept[0]["same_soup"] == ["uniform tau=0.1", "uniform tau=0.5"]
    write_sweep_report(sweep)
    md = (sweep / "report.md").read_text()
    assert "| uniform tau=0.1,0.5 |" in md and "| uniform tau=0.1 |" not in md
    assert "`uniform tau=0.1,0.5` stands for `uniform tau=0.1`, `uniform tau=0.5`" in md
    assert list(pd.read_csv(sweep / "comparison.csv", index_col=0).index)[0] == "uniform tau=0.1,0.5"
    assert "![scores by job](scores.png)" in md.splitlines() and "correlation.png" not in md  # none here
    html = (sweep / "report.html").read_text()
    assert html.count("<img") == 2 and 'src="data:image/png;base64,' in html and "<table>" in html
    p = pivot(comparison_from_results(kept, "test"), {}, "selection.tau")
    assert p.loc["uniform", "tau=0.1"] == p.loc["uniform", "tau=0.5"]  # one soup, both columns


def test_two_operators_are_two_soups_even_with_equal_scores(tmp_path):
    """merge=linear,task_arithmetic: same weights and (rounded) scores, different soups: two rows, not one."""
    sweep = fake_sweep(tmp_path)
    r0 = json.loads((sweep / "0_uniform" / "result.json").read_text())
    r1 = json.loads((sweep / "1_uniform" / "result.json").read_text())
    r0["merge"], r1["merge"] = {"method": "linear"}, {"method": "task_arithmetic", "lambda": 1.0, "normalize": True}
    r1["scores"], r1["base"] = r0["scores"], "/ckpt/base"
    (sweep / "0_uniform" / "result.json").write_text(json.dumps(r0))
    (sweep / "1_uniform" / "result.json").write_text(json.dumps(r1))
    assert len(distinct_soups(load_results(sweep))) == 4
    r1["merge"] = r0["merge"]  # the same operator: one soup again (linear ignores the base)
    (sweep / "1_uniform" / "result.json").write_text(json.dumps(r1))
    assert len(distinct_soups(load_results(sweep))) == 3


def test_selection_text_names_only_experts_with_weight():
    r = fake_result("uniform", 0.1, 0.4) | {"selects": False}
    assert selection_text(r) == "no selection"
    r = fake_result("soce_weighted", 0.1, 0.4) | {
        "weak_set": ["a", "b", "c"],
        "expert_of": {"a": "m1", "b": "m2"},
        "weights": {"m1": 1.0, "m2": 0.0},
        "dropped": {"c": "m3"},
        "max_experts": 2,
    }
    assert selection_text(r) == (
        "L = a, b, c; experts: a -> m1; searched to weight 0: b -> m2; dropped by selection.max_experts=2: c -> m3"
    )


def test_by_takes_short_names_and_refuses_the_strategy(tmp_path, capsys):
    sweep = fake_sweep(tmp_path / "sweep")
    assert main([f"dir={sweep}", "by=tau"]) == 0
    assert "| soce_selected | 45.00 | 10.98 |" in capsys.readouterr().out
    assert main([f"dir={sweep}", "by=strategy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "by=strategy: the strategy names the rows already" in err and "(tau)" in err
