"""Real sweeps through `python -m soce -m ...`: jobs named by their overrides, the MLflow runs a sweep leaves,
concurrent launches, failures, an unreachable tracking server, leaderboard names. Slow: run one at a time."""

import json
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs

import mlflow
import pandas as pd
import pytest
from omegaconf import OmegaConf

from soce.tracking.numbers import percent
from soce.tracking.views import sweep_filter, view_state

from .conftest import ROOT, soce_cmd
from .test_tracking import LEADERBOARD, free_port

ROWS = {  # two families of categories, as in test_scores_only
    "alpha": [80, 78, 60, 62],
    "beta": [30, 32, 85, 83],
    "gamma": [60, 61, 20, 22],
    "delta": [50, 49, 45, 44],
    "eps": [40, 42, 30, 29],
    "zeta": [70, 69, 50, 53],
}


def write_csv(path: Path, names: list[str] | None = None, cats=("x1", "x2", "y1", "y2"), extra: str = "") -> Path:
    names = names or list(ROWS)
    quote = lambda s: '"' + s.replace('"', '""') + '"'  # noqa: E731
    lines = ["model," + ",".join(map(quote, cats)) + ("," + "path" if extra else "")]
    for i, name in enumerate(names):
        row = list(ROWS.values())[i % len(ROWS)]
        jitter = [v + i // len(ROWS) for v in row]
        lines.append(",".join([quote(name), *map(str, jitter)]) + ("," + extra if extra else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def runs(uri: str, experiment: str = "soce-demo") -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment])


def store(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'outputs' / 'mlflow.db'}"


def run_soce(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(soce_cmd(*args), capture_output=True, text=True, cwd=cwd, timeout=timeout)


# ---- a 2 x 2 sweep on the demo, run once for the tests below ----------------------------------------------


@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory, tiny_demo_root):
    tmp = tmp_path_factory.mktemp("sweep2x2")
    p = run_soce(
        "-m",
        "strategy=uniform,soce_selected",
        "selection.tau=0.1,0.5",
        "debug=fast",
        "save_soup=false",
        f"paths.root_dir={tmp}",
        f"demo.root={tiny_demo_root}",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        cwd=tmp,
        timeout=1800,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp


LABELS = ["uniform tau=0.1", "uniform tau=0.5", "soce_selected tau=0.1", "soce_selected tau=0.5"]


def distinct_labels(results: list[dict]) -> list[str]:
    """The rows a report shows: uniform once for both taus (its soup does not depend on tau); soce_selected
    once per distinct expert set."""
    sel = [r for r in results if r["strategy"] == "soce_selected"]
    same = {k: v for k, v in sel[0]["weights"].items() if v} == {k: v for k, v in sel[1]["weights"].items() if v}
    return ["uniform tau=0.1,0.5", *(["soce_selected tau=0.1,0.5"] if same else LABELS[2:])]


@pytest.mark.slow
def test_sweep_reports_one_row_per_distinct_soup(demo_sweep):
    sweep = demo_sweep / "sweep"
    dirs = sorted(
        (d for d in sweep.iterdir() if (d / "result.json").is_file()), key=lambda d: int(d.name.split("_")[0])
    )
    results = [json.loads((d / "result.json").read_text()) for d in dirs]
    assert len(results) == 4 and [r["label"] for r in results] == LABELS
    rows = distinct_labels(results)
    csv = pd.read_csv(sweep / "comparison.csv", index_col=0)
    assert list(csv.index[:-1]) == rows and csv.index[-1].startswith("best single (")
    for r in results:
        row = next(
            lab
            for lab in rows
            if lab.split(" ")[0] == r["label"].split(" ")[0]
            and r["label"].split("=")[1] in lab.split("=")[1].split(",")
        )
        assert csv.loc[row, "overall"] == percent(r["scores"]["test"]["overall"]), row
    md = (sweep / "report.md").read_text()
    assert "overrides that varied: `strategy`, `selection.tau`" in md
    assert all(f"| {lab} |" in md for lab in rows) and "`uniform tau=0.1,0.5` stands for" in md
    assert "`uniform tau=0.1,0.5`: no selection; weights:" in md  # uniform uses no selection: none printed
    p = subprocess.run([*soce_cmd()[:2], "soce.report", f"root={demo_sweep}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    printed = [r for r in p.stdout.splitlines() if r.startswith("| ") and not r.startswith("| |")]
    assert [r.split(" | ")[0][2:] for r in printed[:-1]] == rows
    jobs = runs(store(demo_sweep))
    jobs = jobs[jobs["tags.soce.kind"] == "job"]
    shown = jobs[jobs["tags.soce.distinct"] == "true"]
    assert sorted(shown["tags.mlflow.runName"]) == sorted(rows) == sorted(shown["tags.soce.label"])
    uniform = jobs[jobs["params.strategy"] == "uniform"]
    assert uniform["params.experts"].isna().all() and uniform["params.tau"].isna().all()  # no selection params
    p = subprocess.run([*soce_cmd()[:2], "soce.report", f"root={demo_sweep}", "by=tau"], capture_output=True, text=True)
    assert p.returncode == 0 and "| uniform | " in p.stdout and "tau=0.1 | tau=0.5" in p.stdout, p.stderr
    p = subprocess.run(
        [*soce_cmd()[:2], "soce.report", f"root={demo_sweep}", "by=strategy"], capture_output=True, text=True
    )
    assert p.returncode == 2 and "by=strategy: the strategy names the rows already" in p.stderr


@pytest.mark.slow
def test_sweep_leaves_baseline_runs_and_a_ui_view_of_its_jobs(demo_sweep):
    uri = store(demo_sweep)
    all_runs = runs(uri)
    assert "RUNNING" not in set(all_runs["status"])
    parent = all_runs[all_runs["tags.soce.kind"] == "sweep"].iloc[0]
    base = all_runs[all_runs["tags.soce.kind"] == "baseline"]
    n_candidates = len(json.loads(next(Path(demo_sweep).rglob("result.json")).read_text())["candidate_scores"])
    assert len(base) == n_candidates and set(base["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    assert (base["tags.soce.baseline"] == "best_single").sum() == 1
    p = subprocess.run([*soce_cmd()[:2], "soce.report", "url", f"root={demo_sweep}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    url = next(ln for ln in p.stdout.splitlines() if ln.startswith("jobs of sweep")).split(": ", 1)[1]
    assert url.startswith("http://127.0.0.1:5000/#/experiments/")
    query = parse_qs(url.split("?", 1)[1])
    exp = mlflow.get_experiment_by_name("soce-demo")
    state = view_state(exp.tags["mlflow.sharedViewState." + query["viewStateShareKey"][0]])
    assert state["searchFilter"] == sweep_filter(parent["run_id"]) + " and tags.`soce.distinct` = 'true'"
    found = mlflow.search_runs([exp.experiment_id], filter_string=state["searchFilter"])
    jobs = all_runs[all_runs["tags.soce.kind"] == "job"]
    assert sorted(found["run_id"]) == sorted(jobs[jobs["tags.soce.distinct"] == "true"]["run_id"])
    assert state["selectedColumns"][:4] == [
        "params.`strategy`",
        "params.`tau`",
        "metrics.`test.overall`",
        "metrics.`dev.overall`",
    ]  # the swept params and overall first


@pytest.mark.slow
def test_no_constant_baseline_metric_in_every_job_run(demo_sweep):
    jobs = runs(store(demo_sweep))
    jobs = jobs[jobs["tags.soce.kind"] == "job"]
    assert not [c for c in jobs.columns if c.startswith("metrics.best_single.") and jobs[c].notna().any()]


# ---- concurrent launches -----------------------------------------------------------------------------------

CSV_EXPERIMENT = "soce-s"  # a score table's run is filed under its file name (s.csv), not the demo benchmark


def launch(tmp: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        soce_cmd("-m", "pool=from_csv", f"pool.csv={tmp / 's.csv'}", f"paths.root_dir={tmp}", *args),
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_default_output_dirs_are_unique_per_launch():
    hydra = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "hydra" / "default.yaml"), resolve=False)
    assert hydra["sweep"]["dir"].endswith("_${soce.launch:}") and hydra["run"]["dir"].endswith("_${soce.launch:}")


@pytest.mark.slow
def test_two_sweeps_in_the_same_second_each_keep_their_jobs(tmp_path):
    """The same second (forced: one time prefix), a fresh sqlite store, two different sweeps at once."""
    write_csv(tmp_path / "s.csv")
    same_second = f"hydra.sweep.dir={tmp_path}/multirun/2026-01-01_00-00-00_${{soce.launch:}}"
    procs = [
        launch(tmp_path, "strategy=soce_selected,uniform", f"selection.tau={tau}", same_second) for tau in (0.3, 0.6)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    dirs = sorted((tmp_path / "multirun").iterdir())
    assert len(dirs) == 2 and all((d / "mlflow_parent.json").is_file() for d in dirs)
    r = runs(store(tmp_path), CSV_EXPERIMENT)
    assert set(r["status"]) == {"FINISHED"}
    parents = r[r["tags.soce.kind"] == "sweep"]
    jobs = r[r["tags.soce.kind"] == "job"]
    assert len(parents) == 2 and len(jobs) == 4
    assert sorted(jobs.groupby("tags.mlflow.parentRunId").size()) == [2, 2]
    for d in dirs:
        parent = json.loads((d / "mlflow_parent.json").read_text())["run_id"]
        mine = jobs[jobs["tags.mlflow.parentRunId"] == parent]
        ids = {json.loads(f.read_text())["mlflow_run_id"] for f in d.glob("*/result.json")}
        assert ids == set(mine["run_id"])


HOLDER = """
import sys, time
from soce.tracking.naming import sweep_key
from soce.tracking.store import ensure_experiment
from soce.tracking.runs import resume_or_start
uri, overrides = sys.argv[1], sys.argv[2:]
exp = ensure_experiment(uri, "soce-s")
run_id, _ = resume_or_start(uri, exp, "sweep held", "soce.sweep_key", sweep_key(overrides), tags={"soce.kind": "sweep"})
print(run_id, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_identical_sweep_refuses_while_its_owner_lives_and_resumes_once_it_is_gone(tmp_path):
    """A live process owns the sweep's RUNNING parent (as a first launch would): an identical launch refuses
    with one line and touches nothing; once the owner is killed, the same command resumes that parent."""
    import os
    import signal
    import sys

    write_csv(tmp_path / "s.csv")
    sweep = [
        "pool=from_csv",
        f"pool.csv={tmp_path / 's.csv'}",
        f"paths.root_dir={tmp_path}",
        "strategy=soce_selected,uniform",
    ]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, store(tmp_path), *sweep],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        parent = holder.stdout.readline().strip()
        assert parent, "the holder did not start"
        p = run_soce("-m", *sweep, cwd=tmp_path)
        assert p.returncode == 2, p.stderr[-2000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert lines[-1] == (
            f"soce: error: the same sweep is already running (MLflow run {parent} (sweep held) is "
            f"RUNNING in pid {holder.pid} on {__import__('socket').gethostname()}); wait for it to "
            "end, or change an override"
        )
        r = runs(store(tmp_path), CSV_EXPERIMENT)
        assert list(r["run_id"]) == [parent] and r.iloc[0]["status"] == "RUNNING"  # nothing resumed or added
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    p = run_soce("-m", *sweep, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    r = runs(store(tmp_path), CSV_EXPERIMENT)
    assert set(r["status"]) == {"FINISHED"}
    sweeps, jobs = r[r["tags.soce.kind"] == "sweep"], r[r["tags.soce.kind"] == "job"]
    assert list(sweeps["run_id"]) == [parent] and len(jobs) == 2 and set(jobs["tags.mlflow.parentRunId"]) == {parent}


@pytest.mark.slow
def test_failed_job_leaves_no_run_running(tmp_path):
    """Hydra skips on_multirun_end when a job raises: the parent must end FAILED, not stay RUNNING."""
    (tmp_path / "empty").mkdir()  # a checkpoint dir without weights: the soup cannot be written
    write_csv(tmp_path / "s.csv", extra=str(tmp_path / "empty"))
    p = launch(tmp_path, "strategy=soce_selected,uniform")
    p.communicate(timeout=900)
    assert p.returncode != 0
    r = runs(store(tmp_path), CSV_EXPERIMENT)
    assert "RUNNING" not in set(r["status"])
    assert list(r[r["tags.soce.kind"] == "sweep"]["status"]) == ["FAILED"]  # beside its jobs, in their experiment


# ---- the tracking URI --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["-m", "single"])
def test_unreachable_tracking_server_fails_fast_with_one_line(tmp_path, mode):
    write_csv(tmp_path / "s.csv")
    uri = f"http://127.0.0.1:{free_port()}"
    args = [
        "pool=from_csv",
        f"pool.csv={tmp_path / 's.csv'}",
        "strategy=soce_selected",
        "tracking=server",
        f"tracking.uri={uri}",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    t0 = time.time()
    p = run_soce(*(["-m"] if mode == "-m" else []), *args, cwd=tmp_path, timeout=300)
    took = time.time() - t0
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [f"soce: error: tracking.uri {uri}: no MLflow server answers (Connection refused)"]
    assert took < 90  # python + hydra startup on a loaded 2-core machine; the check itself takes < 3 s
    assert not (tmp_path / "run" / "result.json").exists()


@pytest.mark.slow
def test_unknown_tracking_scheme_is_refused(tmp_path):
    write_csv(tmp_path / "s.csv")
    p = run_soce(
        "pool=from_csv",
        f"pool.csv={tmp_path / 's.csv'}",
        "strategy=soce_selected",
        "tracking.uri=foo://somewhere",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("soce: error: tracking.uri ") and "unknown scheme 'foo'" in lines[0]


# ---- leaderboard names end to end --------------------------------------------------------------------------


@pytest.mark.slow
def test_leaderboard_names_through_scores_only(tmp_path):
    """BFCL-style model names and odd category names: result.json, a FINISHED run in the experiment named after
    the table, names.json maps the MLflow keys back to the real names."""
    cats = ("Non-Live (AST)", "Live Acc", "Multi Turn/Base", "Relevance Detection")
    write_csv(tmp_path / "bfcl_v3_live.csv", LEADERBOARD, cats)
    p = run_soce(
        "pool=from_csv",
        f"pool.csv={tmp_path / 'bfcl_v3_live.csv'}",
        "strategy=soce_selected",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    r = runs(store(tmp_path), "soce-bfcl_v3_live")  # the experiment is named after the table
    job = r[r["run_id"] == result["mlflow_run_id"]].iloc[0]
    assert job["status"] == "FINISHED"
    c = mlflow.MlflowClient(store(tmp_path))
    names = json.loads(Path(c.download_artifacts(job["run_id"], "names.json", str(tmp_path))).read_text())
    params = {
        names.get(k[len("params.") :], k[len("params.") :])
        for k in r.columns
        if k.startswith("params.w.") and pd.notna(job[k])
    }
    assert params == {f"w.{n}" for n in LEADERBOARD}
