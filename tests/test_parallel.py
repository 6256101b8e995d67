"""Points across devices: soce.parallel gives the serial search's results (same scores, order, best point),
with workers that each own a Remixer + live model + evaluator, in threads and in spawned processes."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from soce import method, parallel
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
        return {"syntax": lp[0].mean().item(), "facts": lp[1].mean().item(),
                "worker": f"{os.getpid()}/{threading.get_ident()}"}

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
    workers = [build_worker(models, {"device": "cpu"}),
               build_worker(models, {"device_map": "auto", "expert_placement": "host"})]
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
    workers = [parallel.ProcessWorker(build_worker, models, {"device": "cpu"}, env={"OMP_NUM_THREADS": "1"})
               for _ in range(2)]
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
    assert parallel.remixer_placement([0, 1], 10) == {"device_map": "auto", "max_memory": {0: 10, 1: 10},
                                                      "expert_placement": "auto"}
