"""Many processes and interruptions: joblib workers against a real `mlflow server`, SIGKILL + resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from .conftest import soce_cmd

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def runs_by_kind(uri: str, experiment: str = "soce-demo"):
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment])
    return {k: runs[runs["tags.soce.kind"] == k] for k in ("sweep", "job", "search_point")}


def test_joblib_sweep_against_mlflow_server(tmp_path, tiny_demo_root, mlflow_server):
    args = [
        "-m",
        "strategy=uniform,soce_selected,soce_weighted,best_single",
        "debug=fast",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "tracking=server",
        f"tracking.uri={mlflow_server}",
        f"paths.root_dir={tmp_path}",
        f"demo.root={tiny_demo_root}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    p = subprocess.run(soce_cmd(*args), capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = runs_by_kind(mlflow_server)
    assert len(runs["sweep"]) == 1 and runs["sweep"].iloc[0]["status"] == "FINISHED"
    assert len(runs["job"]) == 4 and set(runs["job"]["status"]) == {"FINISHED"}
    assert set(runs["job"]["tags.mlflow.parentRunId"]) == {runs["sweep"].iloc[0]["run_id"]}
    assert sorted(runs["job"]["params.strategy"]) == ["best_single", "soce_selected", "soce_weighted", "uniform"]
    assert len(list((tmp_path / "sweep").glob("*/result.json"))) == 4


def test_sigkill_then_rerun_evaluates_only_missing_points(tmp_path, tiny_demo_root):
    sweep = tmp_path / "sweep"
    # tau=1: every category with variance is weak, so the tiny zoo gives several experts and a real grid
    args = [
        "-m",
        "strategy=soce_weighted",
        "debug=fast",
        "selection.tau=1.0",
        "selection.max_experts=3",
        f"paths.root_dir={tmp_path}",
        f"demo.root={tiny_demo_root}",
        f"hydra.sweep.dir={sweep}",
    ]
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    proc = subprocess.Popen(
        soce_cmd(*args), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    n_points = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            n_points = len(runs_by_kind(uri)["search_point"])
        except Exception:  # the store or experiment does not exist yet
            continue
        if n_points >= 4:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert n_points >= 4, "the sweep ended before it could be interrupted"
    assert not (sweep / "0_soce_weighted" / "result.json").exists()

    p = subprocess.run(soce_cmd(*args), capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((sweep / "0_soce_weighted" / "result.json").read_text())
    from soce.method import weight_grid

    grid = len(weight_grid(len(result["experts"])))
    assert grid > 4
    runs = runs_by_kind(uri)
    points = runs["search_point"]
    assert len(runs["sweep"]) == 1 and len(runs["job"]) == 1  # resumed, not duplicated
    assert len(points) == grid and points["tags.soce.point"].nunique() == grid
    assert "RUNNING" not in set(mlflow.search_runs(experiment_names=["soce-demo"])["status"])
    # every grid point was evaluated exactly once over the two runs: the second run evaluated only
    # the missing points (+ the final soup on the report split), the rest came from the cache
    assert result["evaluated"] <= grid - n_points + 2
    assert result["cached"] >= n_points


def test_analyses_logged_and_sampled_shapley_matches_exact(tmp_path, tiny_demo_root):
    """analysis=full on the demo: Shapley (exact, then sampled from the same cached soups), consistency and
    emergent solves land in result.json and as MLflow artifacts. Stated tolerance: each sampled value within
    4 standard errors (+0.01) of the exact one."""
    base = [
        "debug=fast",
        "analysis=full",
        "selection.tau=1.0",
        f"paths.root_dir={tmp_path}",
        f"demo.root={tiny_demo_root}",
        "progress=false",
    ]
    out = {}
    for name, extra in {
        "exact": [],
        "sampled": ["analysis.shapley_exact_max=2", "analysis.shapley_permutations=64"],
    }.items():
        p = subprocess.run(
            soce_cmd("strategy=soce_weighted", *base, *extra, f"hydra.run.dir={tmp_path / name}"),
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=1800,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = json.loads((tmp_path / name / "result.json").read_text())
    exact, sampled = out["exact"]["analysis"]["shapley"], out["sampled"]["analysis"]["shapley"]
    assert exact["method"] == "exact" and sampled["method"] == "sampled"
    total = sum(exact["values"].values())
    assert sum(sampled["values"].values()) == pytest.approx(total, abs=1e-9)  # efficiency, both ways
    assert out["sampled"]["evaluated"] <= 3  # the sampled coalitions were all cached by the exact run
    se = pd.read_csv(tmp_path / "sampled" / "artifacts" / "shapley.csv", index_col=0)["stderr"]
    for m, v in exact["values"].items():
        assert abs(sampled["values"][m] - v) <= 4 * se[m] + 0.01, m
    a = out["exact"]["analysis"]
    assert "emergent" in a and 0.0 <= a["emergent"]["share_emergent"] <= 1.0 or a["emergent"]["n_all_fail"] == 0
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    arts = {x.path for x in mlflow.MlflowClient(uri).list_artifacts(out["exact"]["mlflow_run_id"])}
    assert {"shapley.png", "shapley.csv", "emergent.csv"} <= arts
    if len(out["exact"]["experts"]) > 1:
        assert {"consistency.png", "consistency.csv"} <= arts
