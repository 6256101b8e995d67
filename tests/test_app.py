"""The Hydra app: composition, validation at compose time, and one real multirun checked in MLflow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir

from soce.config import register_configs, to_plain
from soce.job.preflight import validate
from soce.tracking.numbers import score

from .conftest import ROOT, soce_cmd

register_configs()


def composed(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["paths.root_dir=/tmp/soce-x", *overrides])


def test_every_job_of_a_sweep_is_checked():
    from soce.job.preflight import job_overrides

    jobs = job_overrides(["a=1,2", "b=x,y", "c=3"])
    assert sorted(map(tuple, jobs)) == [
        ("a=1", "b=x", "c=3"),
        ("a=1", "b=y", "c=3"),
        ("a=2", "b=x", "c=3"),
        ("a=2", "b=y", "c=3"),
    ]
    big = job_overrides(["a=range(0,30)", "b=range(0,30)"])  # 900 jobs: each value once instead
    assert len(big) == 1 + 29 + 29


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["strategy=nonexistent"], "Could not find 'strategy/nonexistent' (available: best_single"),
        (["search.step=abc"], "search.step=abc: Value 'abc' of type 'str' could not be converted to Float"),
        (["+selection.typo=1"], "unknown config key 'selection.typo'"),
        (["-m", "strategy=uniform,nope"], "strategy/nope"),  # every job of a sweep is checked first
        (["pool=example_local"], "checkpoint 'model_a' not found"),
        (
            ["-m", "pool=demo,from_csv", "strategy=uniform,soce_weighted", "pool.csv=scores.csv"],
            "evaluates soups",
        ),  # only the 4th job (from_csv x soce_weighted) is bad
        (["pool=from_csv", "pool.csv=two.csv", "strategy=uniform"], "needs at least 3 models in the population, got 2"),
        (["tracking.uri=ftp://host/x"], "unknown scheme 'ftp'"),
        (["benchmark.categories=[half,nope]"], "category 'nope' is not in the demo zoo"),
        (["pool=example_local", "pool.candidates.model_a=ckpts/a"], "HF_HUB_OFFLINE=1 forbids"),
        (["search.min_weight=-0.1"], "search.min_weight must be in [0, 1)"),
        (["--dry-run", "-m", "strategy=uniform,nope"], "strategy/nope"),
        (
            ["pool=example_local", "pool.candidates={model_a: ck/a, model_b: ck/b, model_c: ck/c}"],
            "lm-eval has no task 'soce_demo_half_dev'",
        ),  # a task lm-eval does not have: before anything runs
    ],
)
def test_cli_bad_input_one_clear_line(tmp_path, args, needle):
    from tests.test_soup import make_model

    named = any("ck/" in a for a in args)  # real checkpoints where a pool names them (preflight reads headers)
    for i, name in enumerate("abc"):
        if named:
            make_model(tmp_path / "ck" / name, i)
        else:
            (tmp_path / "ck" / name).mkdir(parents=True)
    rows = "a,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8\nb,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1\n"
    (tmp_path / "two.csv").write_text("model,half,quad,tri,rev,sort,swap,enc,dec\n" + rows)
    (tmp_path / "scores.csv").write_text(
        "model,half,quad,tri,rev,sort,swap,enc,dec\n" + rows + "c,0.5,0.1,0.9,0.2,0.6,0.3,0.4,0.7\n"
    )
    p = subprocess.run(
        soce_cmd(*args, f"paths.root_dir={tmp_path}"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("soce: error: ") and needle in lines[0]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()  # nothing written


@pytest.mark.slow
def test_real_multirun_logs_parent_children_and_points(tmp_path, tiny_demo_root):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "strategy=uniform,soce_selected,soce_weighted",
        "debug=fast",
        f"paths.root_dir={tmp_path}",
        f"demo.root={tiny_demo_root}",
        f"hydra.sweep.dir={sweep}",
    ]
    p = subprocess.run(soce_cmd(*args), capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]

    results = {r["strategy"]: r for r in (json.loads(f.read_text()) for f in sweep.glob("*/result.json"))}
    assert set(results) == {"uniform", "soce_selected", "soce_weighted"}
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["soce-demo"])
    parents = runs[runs["tags.soce.kind"] == "sweep"]
    jobs = runs[runs["tags.soce.kind"] == "job"]
    points = runs[runs["tags.soce.kind"] == "search_point"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    assert len(jobs) == 3 and set(jobs["status"]) == {"FINISHED"}
    assert set(jobs["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}
    weighted = results["soce_weighted"]
    n_experts = len(weighted["experts"])
    from soce.method import weight_grid

    assert len(points) == len(weight_grid(n_experts))
    assert set(points["tags.mlflow.parentRunId"]) == {weighted["mlflow_run_id"]}

    # result.json contract
    cands = set(weighted["candidate_scores"])
    for r in results.values():
        assert set(r["weights"]) == cands and abs(sum(r["weights"].values()) - 1) < 1e-8  # 9 decimals each
        assert set(r["scores"]) == {"dev", "test"} and "overall" in r["scores"]["test"]
        job = jobs[jobs["run_id"] == r["mlflow_run_id"]].iloc[0]
        assert job["metrics.test.overall"] == score(r["scores"]["test"]["overall"])  # rounded as reports print
        assert all(f"params.w.{c}" in job for c in cands)
    assert results["uniform"]["weights"] == {c: round(1 / len(cands), 9) for c in cands}  # result.json: 9 decimals
    assert {c for c, w in weighted["weights"].items() if w > 0} <= set(weighted["experts"])
    arts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(weighted["mlflow_run_id"])}
    assert {
        "candidate_scores.csv",
        "correlation.png",
        "search_trace.csv",
        "recipe.yaml",
        "config.yaml",
        "result.json",
    } <= arts

    # candidate scores were computed once and reused by the later jobs
    assert results["soce_selected"]["evaluated"] <= 2  # only its own soup (dev + test)

    # the saved soup loads with transformers, and lm-eval's command line gives the logged scores
    from transformers import AutoModelForCausalLM

    soup = Path(weighted["soup_path"])
    AutoModelForCausalLM.from_pretrained(soup)
    manifest = json.loads(next(Path(tiny_demo_root).glob("*/manifest.json")).read_text())
    tasks = ",".join(f"soce_demo_{c}_test" for c in manifest["categories"])
    out = tmp_path / "lm_eval_out"
    cmd = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={soup}",
        "--tasks",
        tasks,
        "--include_path",
        manifest["task_dir"],
        "--batch_size",
        "128",
        "--output_path",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, timeout=600)
    res = json.loads(next(out.rglob("results*.json")).read_text())["results"]
    for c in manifest["categories"]:
        assert res[f"soce_demo_{c}_test"]["acc,none"] == pytest.approx(weighted["scores"]["test"][c])

    # the report reads the table back from MLflow; the sweep's own report is on the parent run
    rep = subprocess.run(
        [sys.executable, "-m", "soce.report", f"root={tmp_path}"], capture_output=True, text=True, check=True
    )
    assert "soce_weighted" in rep.stdout and "best single" in rep.stdout
    parent_arts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parents.iloc[0]["run_id"])}
    assert {"report.md", "comparison.csv", "correlation.png"} <= parent_arts
    assert "Orderings of the paper" in (sweep / "report.md").read_text()

    # the same command again: a new sweep (the first finished), and nothing is evaluated
    sweep2 = tmp_path / "sweep2"
    args2 = [a if not a.startswith("hydra.sweep.dir=") else f"hydra.sweep.dir={sweep2}" for a in args]
    p = subprocess.run(soce_cmd(*args2), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    again = [json.loads(f.read_text()) for f in sweep2.glob("*/result.json")]
    assert len(again) == 3 and sum(r["evaluated"] for r in again) == 0
    assert {r["strategy"]: r["scores"] for r in again} == {k: r["scores"] for k, r in results.items()}


@pytest.mark.parametrize("exp", ["paper_bfcl_70b", "paper_bfcl_8b", "paper_mgsm_7b", "demo_paper_protocol", "demo_gpu"])
def test_paper_presets_compose(exp, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # where the hub is reachable, hub ids are valid checkpoints
    cfg = composed(f"experiment={exp}")
    assert cfg.strategy.name == "soce_weighted"
    if exp == "paper_bfcl_70b":
        assert cfg.pool.candidates.xlam2_70b == "Salesforce/Llama-xLAM-2-70b-fc-r" and len(cfg.pool.candidates) == 4
        assert "multi_turn_base" in cfg.benchmark.categories
        validate(to_plain(cfg))  # hub ids are not checked as local paths
    if exp == "paper_mgsm_7b":
        assert cfg.benchmark.task.format(category="de") == "mgsm_direct_de"


def test_slurm_launcher_preset_composes():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "paths.root_dir=/x"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1


def test_dry_run_lists_the_jobs_of_a_sweep(tmp_path):
    p = subprocess.run(
        soce_cmd(
            "--dry-run",
            "-m",
            "strategy=soce_selected,soce_weighted",
            "selection.tau=0.1,0.5",
            f"paths.root_dir={tmp_path}",
        ),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == "4 jobs; nothing was run"
    assert "strategy=soce_weighted selection.tau=0.1" in "\n".join(lines)
    assert not (tmp_path / "outputs").exists()


def test_help_says_what_soce_does_and_is_fast(tmp_path):
    import time

    t0 = time.perf_counter()
    p = subprocess.run(soce_cmd("--help"), capture_output=True, text=True, cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert p.returncode == 0 and "category-aware model souping" in p.stdout
    for command in ("soce.report", "soce.merge", "soce.sweep", "soce.collect"):
        assert command in p.stdout
    assert "strategy: best_single" in p.stdout
    assert seconds < 5  # 0.5 s on a quiet 2-core machine; generous for loaded CI
    # the merge example it prints is a command line soce.merge takes (it once showed a=<ckpt> b=<ckpt>)
    import shlex

    from soce.merge import parse_args

    line = next(x for x in p.stdout.splitlines() if "python -m soce.merge" in x)
    args = [a for a in shlex.split(line.split("soce.merge", 1)[1]) if "=" in a]
    kw = parse_args([a.replace("<dir>", str(tmp_path / "o")) for a in args])
    assert list(kw["models"]) == ["A", "B"] and kw["weights"] == {"A": 0.7, "B": 0.3}


def test_import_config_is_light():
    code = "import sys, soce.config; print(int(any(m in sys.modules for m in ('torch', 'transformers', 'pandas'))))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.strip() == "0", p.stderr
