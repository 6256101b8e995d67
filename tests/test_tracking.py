"""The MLflow layer against real stores: sqlite files, and a real `mlflow server` where HTTP matters."""

import json
import os
import socket
import subprocess
import sys
import time

import mlflow
import pytest

from soce.tracking.naming import JobName, job_label, job_name, short_keys
from soce.tracking.numbers import fmt_pct, percent, score
from soce.tracking.runs import (
    JobTracker,
    RunBusy,
    log_baselines,
    owner_gone,
    reap_orphans,
    resume_or_start,
    split_metrics,
    start_run,
)
from soce.tracking.store import check_tracking_uri, ensure_experiment, mlflow_key, mlflow_keys
from soce.tracking.views import save_view, sweep_filter, ui_url, view_state

from .test_scale import free_port, mlflow_server  # noqa: F401  (fixture: a real server on 127.0.0.1)

LEADERBOARD = [  # names as public leaderboards spell them
    "xLAM-2-8b-fc-r (FC)",
    "watt-tool-70B (FC)",
    "Qwen2.5-72B-Instruct (Prompt)",
    "GPT-4o-2024-11-20 (FC)",
    "Llama-3.1-Nemotron-70B-Instruct-HF (Prompt)",
    "模型-中文 (FC)",
    "Café/Déjà-vu",
    "a" * 260,
    "a(b)",
    "a)b(",
    "a_b_",
    "../etc",
    "x,y",
]


def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_job_tracker_nested_points(tmp_path):
    uri = sqlite_uri(tmp_path)
    exp = ensure_experiment(uri, "soce-test", str(tmp_path / "art"))
    assert ensure_experiment(uri, "soce-test") == exp
    assert mlflow.MlflowClient(uri).get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    parent = start_run(uri, exp, "sweep", tags={"soce.kind": "sweep"})
    name = job_name(["strategy=soce_weighted", "selection.tau=0.1"], ["strategy", "selection.tau"])
    assert name.label == "soce_weighted tau=0.1" and name.key is None
    job = JobTracker.start(uri, "soce-test", None, name, parent, {"soce.kind": "job"})
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
    assert jobrow["tags.mlflow.runName"] == jobrow["tags.soce.label"] == "soce_weighted tau=0.1"
    assert json.loads(jobrow["tags.soce.overrides"]) == {"strategy": "soce_weighted", "selection.tau": "0.1"}
    assert jobrow["metrics.test.overall"] == 0.5 and jobrow["params.w.m1"] == "0.7"
    assert [a.path for a in mlflow.MlflowClient(uri).list_artifacts(job.run_id)] == ["x.csv"]  # no names.json


def test_one_rounding_for_metrics_logs_and_reports():
    """The log said 15.97% where report.md said 15.98: every number goes through one rounding."""
    for x in (0.15975, 0.1598, 1 / 3, 0.015, 0.99995, 0.12345, 0.0, 1.0):
        assert percent(score(x)) == percent(x)
        assert fmt_pct(x) == f"{percent(x):.2f}" == f"{100 * score(x):.2f}"
    assert fmt_pct(0.15975) == "15.98" and score(0.15975) == 0.1598
    assert split_metrics({"test": {"a": 0.123456}}) == {"test.a": 0.1235}


def test_mlflow_key_is_valid_distinct_and_stable():
    keys = mlflow_keys([f"w.{n}" for n in LEADERBOARD])
    assert len(set(keys.values())) == len(LEADERBOARD)
    assert keys["w.xLAM-2-8b-fc-r (FC)"].startswith("w.xLAM-2-8b-fc-r _FC_")
    assert keys["w.Café/Déjà-vu"].startswith("w.Cafe/Deja-vu")
    assert keys["w.a_b_"] == "w.a_b_"  # valid names stay as they are
    assert all(len(k) <= 250 for k in keys.values())
    assert mlflow_key("w.a(b)") == mlflow_key("w.a(b)") != mlflow_key("w.a)b(")
    assert mlflow_keys(["a b", "a_b"]) == {"a b": "a b", "a_b": "a_b"}


def test_leaderboard_names_through_the_real_store(tmp_path):
    """Any leaderboard name as a param, a metric and a search point: the run FINISHES, names.json maps back."""
    uri = sqlite_uri(tmp_path)
    job = JobTracker.start(
        uri, "soce-test", str(tmp_path / "art"), JobName("soce_selected"), None, {"soce.kind": "job"}
    )
    weights = {n: 1 / len(LEADERBOARD) for n in LEADERBOARD}
    job.log({f"w.{n}": w for n, w in weights.items()}, {f"dev.{n}": 0.5 for n in LEADERBOARD})
    job.log_point(0, weights, {n: 0.25 for n in LEADERBOARD}, "dev")
    job.end()
    c = mlflow.MlflowClient(uri)
    run = c.get_run(job.run_id)
    assert run.info.status == "FINISHED"
    names = json.loads(open(c.download_artifacts(job.run_id, "names.json", str(tmp_path))).read())
    assert set(names.values()) >= {f"w.{n}" for n in LEADERBOARD if mlflow_key(f"w.{n}") != f"w.{n}"}
    assert {names.get(k, k) for k in run.data.params} == {f"w.{n}" for n in LEADERBOARD}
    assert {names.get(k, k) for k in run.data.metrics} == {f"dev.{n}" for n in LEADERBOARD}


def test_job_label_names_the_varying_overrides():
    ov = ["strategy=soce_weighted", "selection.tau=0.1", "debug=fast", "paths.root_dir=/x"]
    assert job_label(ov, ["strategy", "selection.tau"]) == "soce_weighted tau=0.1"
    assert job_label(ov, []) == "soce_weighted"
    assert job_label(["selection.tau=0.5"], ["selection.tau"], strategy="uniform") == "uniform tau=0.5"
    assert job_label(["+a.tau=1", "b.tau=2"], ["a.tau", "b.tau"]) == "a.tau=1 b.tau=2"  # ambiguous: longer
    assert short_keys(["selection.max_experts", "search.step"]) == {
        "selection.max_experts": "max_experts",
        "search.step": "step",
    }


def test_varying_keys_of_a_sweep():
    from soce.tracking.naming import varying_keys

    ov = [
        "strategy=soce_selected,soce_weighted",
        "selection.tau=0.1,0.5",
        "debug=fast",
        "hydra.launcher.n_jobs=2,3",
        "search.step=range(0.1,0.3,0.1)",
        "pool=demo",
    ]
    assert varying_keys(ov) == ["strategy", "selection.tau", "search.step"]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_owner_gone_same_host_and_other_host():
    host = socket.gethostname()
    assert not owner_gone(f"{host}:{os.getpid()}:", None)
    assert owner_gone(f"{host}:{dead_pid()}:", None)
    assert owner_gone(f"{host}:{os.getpid()}:1", None)  # the pid now belongs to another process (start time)
    assert not owner_gone("elsewhere:1:", time.time() - 10)  # another host: heartbeat fresh
    assert owner_gone("elsewhere:1:", time.time() - 3600)  # another host: heartbeat stale
    assert owner_gone(None, None)  # runs from before owners: resumable as before


def test_running_run_is_resumed_only_when_its_owner_is_gone(tmp_path):
    uri = sqlite_uri(tmp_path)
    exp = ensure_experiment(uri, "soce-test")
    mine, resumed = resume_or_start(uri, exp, "sweep", "soce.sweep_key", "k1")
    assert not resumed
    with pytest.raises(RunBusy, match=f"{mine}.*RUNNING in pid {os.getpid()}"):
        resume_or_start(uri, exp, "sweep", "soce.sweep_key", "k1")  # its owner (this process) is alive
    c = mlflow.MlflowClient(uri)
    c.set_tag(mine, "soce.owner", f"{socket.gethostname()}:{dead_pid()}:")
    again, resumed = resume_or_start(uri, exp, "sweep", "soce.sweep_key", "k1")
    assert (again, resumed) == (mine, True)
    assert c.get_run(mine).data.tags["soce.owner"].split(":")[1] == str(os.getpid())


def test_orphans_of_a_dead_launch_are_marked_killed(tmp_path):
    uri = sqlite_uri(tmp_path)
    exp = ensure_experiment(uri, "soce-test")
    live = start_run(uri, exp, "live")
    dead = start_run(uri, exp, "dead", tags={"soce.owner": f"{socket.gethostname()}:{dead_pid()}:"})
    assert reap_orphans(uri, exp) == [dead]
    c = mlflow.MlflowClient(uri)
    assert (c.get_run(dead).info.status, c.get_run(live).info.status) == ("KILLED", "RUNNING")


CONCURRENT = """
import sys, time
from soce.tracking.store import ensure_experiment
from soce.tracking.runs import start_run
t0 = float(sys.argv[2])
while time.time() < t0:
    time.sleep(0.001)
exp = ensure_experiment(sys.argv[1], "soce-race")
start_run(sys.argv[1], exp, "r")
print("ok")
"""


def test_fresh_sqlite_store_under_concurrent_first_use(tmp_path):
    """Four processes create the same fresh store at the same instant: MLflow's migrations run once."""
    uri = sqlite_uri(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    t0 = str(time.time() + 8)  # every process has imported mlflow by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, uri, t0],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-1500:] for o in outs]
    mlflow.set_tracking_uri(uri)
    assert len(mlflow.search_runs(experiment_names=["soce-race"])) == 4


def test_baselines_once_per_sweep(tmp_path):
    uri = sqlite_uri(tmp_path)
    exp = ensure_experiment(uri, "soce-test")
    parent = start_run(uri, exp, "sweep", tags={"soce.kind": "sweep"})
    cands = {"m1": {"dev": {"a": 0.5, "overall": 0.5}}, "m2 (FC)": {"dev": {"a": 0.123456, "overall": 0.7}}}
    ids = log_baselines(uri, exp, parent, cands, "m2 (FC)")
    assert set(log_baselines(uri, exp, parent, cands, "m2 (FC)")) == set(ids) and len(ids) == 2
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs([exp], filter_string=sweep_filter(parent, "baseline"))
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    best = runs[runs["tags.soce.baseline"] == "best_single"].iloc[0]
    assert best["tags.mlflow.runName"] == "best single (m2 (FC))" and best["metrics.dev.a"] == 0.1235


def test_saved_view_selects_exactly_the_sweeps_job_runs(tmp_path):
    uri = sqlite_uri(tmp_path)
    exp = ensure_experiment(uri, "soce-test")
    parents = [start_run(uri, exp, f"sweep {i}", tags={"soce.kind": "sweep"}) for i in range(2)]
    jobs = [start_run(uri, exp, f"job {i}", p, {"soce.kind": "job"}) for p in parents for i in range(2)]
    start_run(uri, exp, "point", jobs[0], {"soce.kind": "search_point"})
    start_run(uri, exp, "best single", parents[0], {"soce.kind": "baseline"})
    key = save_view(
        uri,
        exp,
        f"soce-{parents[0]}",
        sweep_filter(parents[0]),
        ["metrics.`test.overall`"],
        parallel=(["w.a"], ["dev.overall"]),
    )
    url = ui_url("http://127.0.0.1:5000", exp, key)
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={key}&compareRunsMode=TABLE"
    )  # the training view, not MLflow's GenAI one
    tag = json.loads(mlflow.MlflowClient(uri).get_experiment(exp).tags[f"mlflow.sharedViewState.{key}"])
    assert tag["name"] == key and isinstance(tag["createdAt"], int)  # the envelope the "Views" menu lists
    state = view_state(json.dumps(tag))
    assert state["compareRunCharts"][0]["type"] == "PARALLEL"
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs([exp], filter_string=state["searchFilter"])
    assert sorted(found["run_id"]) == sorted(jobs[:2])


def test_check_tracking_uri_schemes_and_closed_port(tmp_path):
    assert check_tracking_uri(sqlite_uri(tmp_path)) is None
    assert "unknown scheme 'foo'" in check_tracking_uri("foo://x")
    assert "use an absolute path" in check_tracking_uri("sqlite:///rel.db")
    t0 = time.time()
    problem = check_tracking_uri(f"http://127.0.0.1:{free_port()}")
    assert time.time() - t0 < 5
    assert problem.startswith("tracking.uri http://127.0.0.1:") and problem.endswith(
        "no MLflow server answers (Connection refused)"
    )
    with socket.socket() as s:  # a port that accepts connections but never answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        t0 = time.time()
        problem = check_tracking_uri(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=1)
        assert problem.endswith("(no answer within 1 s)") and time.time() - t0 < 3


@pytest.mark.slow
def test_check_tracking_uri_against_a_real_server(mlflow_server):  # noqa: F811
    assert check_tracking_uri(mlflow_server) is None


def test_mlflow_gives_up_on_a_dead_server_within_seconds():
    """MLflow's own retries (7, backoff 2: minutes) are cut to a few seconds for soce's processes."""
    from soce.tracking.store import client

    uri = f"http://127.0.0.1:{free_port()}"
    c = client(uri)  # sets MLFLOW_HTTP_REQUEST_MAX_RETRIES/TIMEOUT/BACKOFF_FACTOR unless the user did
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    t0 = time.time()
    with pytest.raises(Exception):  # noqa: B017 (MLflow's exception type for exhausted retries varies)
        c.search_experiments(max_results=1)
    assert time.time() - t0 < 20
