"""Points across devices: soce.search.parallel gives the serial search's results (same scores, order, best point),
with workers that each own a Remixer + live model + evaluator, in threads and in spawned processes."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from soce import method
from soce.search import parallel
from soce.soup import Remixer
from tests.test_soup import make_model

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4], [6, 2, 2, 9, 1, 3, 5, 7]])


def build_worker(models: dict[str, str], kw: dict) -> parallel.Worker:
    """One worker: its own Remixer (``kw``: placement) and a real evaluator, the mean next-token log-likelihood
    of two fixed sequences, one per category. Module-level, so that a spawned process can import it."""
    rmx = Remixer(models, **kw)

    def evaluate(weights: dict[str, float]) -> dict:
        model = rmx.mix(weights)
        with torch.no_grad():
            logits = model(IDS.to(rmx.device)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, IDS[:, 1:, None].to(rmx.device)).squeeze(-1)
        return {
            "syntax": lp[0].mean().item(),
            "facts": lp[1].mean().item(),
            "worker": f"{os.getpid()}/{threading.get_ident()}",
        }

    return evaluate


def failing_factory() -> parallel.Worker:
    raise RuntimeError("no GPU here, says the factory")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pzoo")
    return {n: str(make_model(d / n, s)) for n, s in (("a", 41), ("b", 42), ("c", 43))}


def _search(names: list[str], points: list[tuple[float, ...]], evaluate) -> method.SearchResult:
    seen: list[int] = []
    res = method.search_weights(names, points, lambda w: _scores(evaluate(w)), lambda i, w, s: seen.append(i))
    assert seen == list(range(len(points)))
    return res


def _scores(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "worker"}


def test_threads_give_the_serial_search(models):
    names = list(models)
    points = method.weight_grid(3, 0.1, 0.1)
    serial_worker = build_worker(models, {"device": "cpu"})
    serial = _search(names, points, serial_worker)
    workers = [
        build_worker(models, {"device": "cpu"}),
        build_worker(models, {"device_map": "auto", "expert_placement": "host"}),
    ]
    ws = [dict(zip(names, map(float, p), strict=True)) for p in points]
    done: list[int] = []
    results = parallel.evaluate_points(workers, ws, on_done=lambda i, p, r: done.append(i))
    assert sorted(done) == list(range(len(ws)))
    assert len({r["worker"] for r in results}) == 2  # both workers took points
    par = _search(names, points, parallel.replay(ws, results))
    assert par.weights == serial.weights and par.scores == serial.scores
    assert par.trace.equals(serial.trace)


def test_processes_give_the_serial_search(models):
    names = list(models)
    points = method.weight_grid(3, 0.25, 0.25)  # 3 grid points + uniform
    ws = [dict(zip(names, map(float, p), strict=True)) for p in points]
    serial = [_scores(r) for r in parallel.evaluate_points([build_worker(models, {"device": "cpu"})], ws)]
    workers = [
        parallel.ProcessWorker(build_worker, models, {"device": "cpu"}, env={"OMP_NUM_THREADS": "1"}) for _ in range(2)
    ]
    try:
        results = parallel.evaluate_points(workers, ws)
        pids = {w.ready() for w in workers}
    finally:
        for w in workers:
            w.close()
    assert len(pids) == 2 and os.getpid() not in pids
    assert [_scores(r) for r in results] == serial


def test_first_failing_point_is_raised_and_no_new_point_starts():
    started: list[int] = []

    def worker(p: dict) -> dict:
        started.append(int(p["i"]))
        if p["i"] in (3, 5):
            raise ValueError(f"point {int(p['i'])} broke")
        return {"i": p["i"]}

    with pytest.raises(ValueError, match="point 3 broke"):
        parallel.evaluate_points([worker, worker], [{"i": float(i)} for i in range(40)])
    assert len(started) < 40
    assert parallel.evaluate_points([worker], [{"i": 0.0}, {"i": 1.0}]) == [{"i": 0.0}, {"i": 1.0}]
    with pytest.raises(ValueError, match="no workers"):
        parallel.evaluate_points([], [{"i": 0.0}])


def test_process_worker_errors_carry_the_traceback(models):
    broken = parallel.ProcessWorker(failing_factory)  # both start at once
    served = parallel.ProcessWorker(build_worker, models, {"device": "cpu"})
    try:
        with pytest.raises(parallel.WorkerError, match="no GPU here, says the factory"):
            broken({"a": 1.0})
        with pytest.raises(parallel.WorkerError, match="not a candidate"):
            served({"zz": 1.0})
        assert set(_scores(served({"a": 1.0}))) == {"syntax", "facts"}  # still serving after an error
    finally:
        broken.close()
        served.close()
    assert not served._proc.is_alive()


def test_replay_and_groups():
    ev = parallel.replay([{"a": 0.5, "b": 0.5}], [{"x": 1.0}])
    assert ev({"b": 0.5, "a": 0.5}) == {"x": 1.0}
    with pytest.raises(KeyError):
        ev({"a": 1.0})
    assert parallel.device_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert parallel.device_groups(3, 2) == [[0, 1]] and parallel.device_groups(2) == [[0], [1]]
    assert parallel.remixer_placement([3]) == {"device": "cuda:3"}
    assert parallel.remixer_placement([0, 1], 10) == {
        "device_map": "auto",
        "max_memory": {0: 10, 1: 10},
        "expert_placement": "auto",
    }


# ----------------------------------------------------------------- sweep mode: one GPU slot per job process

CLAIM = (
    "import json, sys, time\nfrom soce.search.gpu_assign import claim\n"
    "try:\n    got = claim(2, sys.argv[1], poll_s=0.05, timeout_s=float(sys.argv[2]))\n"
    "except TimeoutError as e:\n    got = str(e)\n"
    "print(json.dumps(got), flush=True)\ntime.sleep(float(sys.argv[3]))\n"
)


def test_claim_gives_each_process_its_own_slot(tmp_path):
    import json
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    run = [sys.executable, "-c", CLAIM, str(tmp_path)]
    holders = [subprocess.Popen([*run, "60", "4"], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    got = [json.loads(p.stdout.readline()) for p in holders]
    assert sorted(got) == [["0", "1"], ["2", "3"]]  # two slots of two GPUs, one each
    late = subprocess.run([*run, "0.3", "0"], capture_output=True, text=True, env=env)
    assert "no free GPU slot of 2" in late.stdout  # both slots held: it waits, here up to 0.3 s
    holders[0].kill()  # the kernel releases a dead process's lock
    holders[0].wait()
    after = subprocess.run([*run, "60", "0"], capture_output=True, text=True, env=env)
    assert json.loads(after.stdout) == got[0]
    holders[1].kill()
    holders[1].wait()
    nogpu = subprocess.run([*run, "1", "0"], capture_output=True, text=True, env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert json.loads(nogpu.stdout) is None  # no GPUs: CPU jobs, nothing set


APP = """
import json, os, time
import hydra

@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    t0 = time.time()
    time.sleep(0.4)
    rec = {"x": cfg.x, "pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "t0": t0, "t1": time.time()}
    (Path(cfg.out) / f"{cfg.x}.json").write_text(json.dumps(rec))

from pathlib import Path
if __name__ == "__main__":
    main()
"""


def test_joblib_sweep_jobs_get_distinct_gpus(tmp_path):
    """A real Hydra multirun through the joblib launcher (2 worker processes): concurrent jobs never share a GPU,
    and each worker process keeps one GPU for all its jobs."""
    import json
    import subprocess
    import sys

    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "out").mkdir()
    (tmp_path / "config.yaml").write_text(
        f"x: 0\nout: {tmp_path / 'out'}\nhydra:\n  sweep: {{dir: {tmp_path / 'multirun'}}}\n"
        f"  run: {{dir: {tmp_path / 'run'}}}\n  callbacks:\n    gpu_assign:\n"
        f"      _target_: soce.search.gpu_assign.GpuAssign\n      gpus_per_job: 1\n"
        f"      lock_dir: {tmp_path / 'locks'}\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "4,7", "PYTHONPATH": root}
    subprocess.run(
        [
            sys.executable,
            str(tmp_path / "app.py"),
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "x=1,2,3,4,5,6",
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    recs = [json.loads(f.read_text()) for f in sorted((tmp_path / "out").glob("*.json"))]
    assert len(recs) == 6 and {r["gpus"] for r in recs} <= {"4", "7"}
    by_pid: dict[int, set] = {}
    for r in recs:
        by_pid.setdefault(r["pid"], set()).add(r["gpus"])
    assert len(by_pid) >= 2 and all(len(g) == 1 for g in by_pid.values())  # 2 workers, one GPU each
    for a in recs:
        for b in recs:
            if a is not b and a["t0"] < b["t1"] and b["t0"] < a["t1"]:  # ran at the same time
                assert a["gpus"] != b["gpus"], (a, b)


def test_sharded_remix_bench_tiny(tmp_path):
    """bench/sharded_remix.py --tiny runs on a CPU; its last line is the JSON summary, bits all equal."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        os.path.join(root, "bench", "sharded_remix.py"),
        "--tiny",
        "--parallel-modes",
        "threads",
        "--workdir",
        str(tmp_path),
        "--json",
        str(tmp_path / "r.json"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": root})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == json.loads((tmp_path / "r.json").read_text())
    for r in (res["single"], res["sharded"]["with_shard"], res["sharded"]["host"]):
        assert r["bits_differing"]["differing_elements"] == 0 and r["bits_differing"]["tensors"] == 39
        assert r["remix_s"]["median"] > 0 and r["tokens_per_s"] > 0
    assert res["parallel"]["threads"]["identical_to_serial"] is True
