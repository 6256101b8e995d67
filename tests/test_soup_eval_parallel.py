"""SoupEvaluator across workers: a grid of soups scored by 2 workers (threads) equals the serial scores."""

from soce import method
from soce.benchmarks.lmeval import Evaluator
from soce.search import parallel
from soce.search.evaluator import on_devices
from tests.test_soup_eval import make, zoo  # noqa: F401  (the module fixture)


def test_scores_many_over_two_workers_equals_serial(zoo, tmp_path):  # noqa: F811
    base = make(zoo, tmp_path / "a")
    names = list(zoo["candidates"])[:3]
    ws = [dict(zip(names, map(float, p), strict=True)) for p in method.weight_grid(3, 0.25, 0.25)]
    serial = [make(zoo, tmp_path / "s").scores(w, "dev") for w in ws]
    workers = on_devices(base, 2, lambda d: Evaluator(base.evaluator.benchmark, d), n_gpus=0)
    assert workers[0] is base and workers[1] is not base and workers[1].cache is base.cache
    got = base.scores_many(ws, "dev", workers)
    assert got == serial
    assert base.timings and workers[1].timings  # both evaluated soups
    grid = method.weight_grid(3, 0.25, 0.25)
    par, ser = (method.search_weights(names, grid, parallel.replay(ws, r)) for r in (got, serial))
    assert par.weights == ser.weights and par.trace.equals(ser.trace)
