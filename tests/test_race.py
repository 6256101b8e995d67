"""The racing rule (soce.search.race) on synthetic item-score matrices: subsets, bound, elimination, budget, seeds.

The stand-in for a benchmark is a fixed matrix of per-item 0/1 outcomes per point, built with common random
numbers (one latent difficulty per item, shared by every point), so that neighbouring points agree on most
items as real soups do. The end-to-end race on the real demo is in tests/test_race_demo.py.
"""

import math

import numpy as np
import pytest

from soce import method
from soce.search import race as R


def matrix(n_points=85, k=8, n=200, seed=0, spread=0.3):
    """(points, item ids, Y[p][c][i] outcomes, full-split overall per point) for a 4-expert grid."""
    rng = np.random.default_rng(seed)
    pts = method.weight_grid(4)[:n_points]
    skill = rng.uniform(0.1, 0.8, size=(4, k))
    cats = [f"c{j}" for j in range(k)]
    u = rng.uniform(size=(k, n))
    y = {}
    for p, w in enumerate(pts):
        w = np.array(w)
        q = w @ skill - spread * ((w - 0.25) ** 2).sum()
        out = (u + 0.03 * rng.normal(size=(k, n)) < q[:, None]).astype(float)
        y[p] = {c: {str(i): out[j, i] for i in range(n)} for j, c in enumerate(cats)}
    ids = {c: [str(i) for i in range(n)] for c in cats}
    full = np.array([np.mean([np.mean(list(y[p][c].values())) for c in cats]) for p in y])
    return pts, ids, y, full


class Oracle:
    """score_items backed by the matrix; records every request (point, items)."""

    def __init__(self, y):
        self.y, self.calls = y, []

    def __call__(self, p, items):
        self.calls.append((p, {c: list(v) for c, v in items.items()}))
        return {c: {i: self.y[p][c][i] for i in ids} for c, ids in items.items()}

    @property
    def items(self):
        return sum(len(v) for _, it in self.calls for v in it.values())


def test_schedule_is_nested_stratified_and_ends_on_the_whole_split():
    plan = R.schedule({"a": 200, "b": 50}, 0.05, 2.0)
    assert plan[0] == {"a": 10, "b": 3}
    assert plan[-1] == {"a": 200, "b": 50}
    assert all(all(p[c] <= q[c] for c in p) for p, q in zip(plan, plan[1:], strict=False))
    assert R.schedule({"a": 3}, 0.05, 2.0)[0] == {"a": 2}  # min_items
    assert R.schedule({"a": 1}, 0.05, 2.0) == [{"a": 1}]


def test_item_order_is_seeded_deterministic_and_a_permutation():
    ids = {"a": [str(i) for i in range(50)]}
    o1, o2, o3 = R.item_order(ids, 0), R.item_order(ids, 0), R.item_order(ids, 1)
    assert o1 == o2 and o1 != o3 and sorted(o1["a"]) == sorted(ids["a"])
    assert R.item_order({"a": list(reversed(ids["a"]))}, 0) == o1  # independent of the input order


def test_paired_bound_weights_categories_and_is_exact_on_the_whole_split():
    a = {"x": 0.5, "y": 0.5}
    d = {"x": np.array([1.0, 0.0, 0.0, 1.0]), "y": np.array([0.0, -1.0])}
    diff, se = R.paired_bound(d, a, {"x": 4, "y": 2})
    assert diff == pytest.approx(0.5 * 0.5 + 0.5 * -0.5)  # the mean of category means, not of items
    assert se == 0.0  # finite-population correction: every item seen
    diff, se = R.paired_bound(d, a, {"x": 100, "y": 100})
    assert se > 0
    _, se0 = R.paired_bound({"x": np.zeros(10)}, {"x": 1.0}, {"x": 100})
    assert se0 == pytest.approx(math.sqrt(0.9 * (1 / 10) / 10))  # variance floor 1/m: never "certain"


def test_race_finds_the_full_split_best_for_a_fraction_of_the_grid():
    pts, ids, y, full = matrix()
    oracle = Oracle(y)
    out = R.race(len(pts), ids, oracle, R.RaceSettings(budget=0.2 * len(pts)))
    assert out.best == int(np.argmax(full))
    assert out.scores["overall"] == pytest.approx(full.max())
    assert out.items_evaluated == oracle.items <= 0.2 * len(pts) * 1600
    assert out.full_split_equivalents == pytest.approx(out.items_evaluated / 1600)
    assert out.rounds[-1]["finals"] and out.rounds[0]["alive"] == len(pts)


def test_race_never_asks_twice_for_an_item_of_a_point():
    pts, ids, y, _ = matrix()
    oracle = Oracle(y)
    R.race(len(pts), ids, oracle, R.RaceSettings())
    seen = set()
    for p, items in oracle.calls:
        for c, v in items.items():
            for i in v:
                assert (p, c, i) not in seen
                seen.add((p, c, i))


def test_clearly_worse_points_are_dropped_early_and_the_best_never_is():
    pts, ids, y, full = matrix(spread=3.0)  # steep objective: far points are much worse
    out = R.race(len(pts), ids, Oracle(y), R.RaceSettings())
    best = int(np.argmax(full))
    assert out.points[best]["dropped_in_round"] is None
    dropped_early = [r for r in out.points if r["dropped_in_round"] in (1, 2)]
    assert len(dropped_early) > len(pts) // 3
    worst = int(np.argmin(full))
    assert out.points[worst]["dropped_in_round"] is not None and out.points[worst]["items"] < 400


def test_ties_keep_every_point_and_pick_the_first():
    ids = {"a": [str(i) for i in range(40)]}
    same = {p: {"a": {i: float(int(i) % 3 == 0) for i in ids["a"]}} for p in range(5)}
    out = R.race(5, ids, Oracle(same), R.RaceSettings(finalists=2, keep=1.0))
    assert out.best == 0 and all(r["dropped_in_round"] is None for r in out.points)  # the bound never drops a tie


def test_halving_keeps_the_best_share_by_estimate_and_never_fewer_than_the_finalists():
    pts, ids, y, _ = matrix()
    out = R.race(len(pts), ids, Oracle(y), R.RaceSettings(keep=0.5, finalists=5))
    alive = [r["alive"] for r in out.rounds]
    assert alive[0] == 85 and all(b <= max(5, math.ceil(a / 2)) for a, b in zip(alive, alive[1:], strict=False))
    first = out.rounds[0]
    survivors = [r for r in out.points if r["dropped_in_round"] != 1]
    assert len(survivors) == max(5, math.ceil(first["alive"] / 2)) or first["dropped"] > 42
    bound_only = R.race(len(pts), ids, Oracle(y), R.RaceSettings(keep=1.0))
    assert bound_only.rounds[0]["dropped"] < first["dropped"]


def test_finalists_shrink_to_what_a_small_budget_affords():
    pts, ids, y, _ = matrix()
    oracle = Oracle(y)
    out = R.race(len(pts), ids, oracle, R.RaceSettings(finalists=8, budget=6.0))  # 85 x 80 items + ~1.8 more
    assert oracle.items <= 6.0 * 1600 and out.rounds[-1]["finals"] and out.rounds[0]["alive"] == 85


def test_deterministic_for_a_seed_and_the_seed_changes_the_items():
    pts, ids, y, _ = matrix()
    a, b, c = Oracle(y), Oracle(y), Oracle(y)
    ra = R.race(len(pts), ids, a, R.RaceSettings(seed=3, budget=17))
    rb = R.race(len(pts), ids, b, R.RaceSettings(seed=3, budget=17))
    R.race(len(pts), ids, c, R.RaceSettings(seed=4, budget=17))
    assert a.calls == b.calls and ra.best == rb.best and ra.rounds == rb.rounds
    assert a.calls[0] != c.calls[0]


@pytest.mark.parametrize("budget", [6.0, 10.0, 17.0, 40.0])
def test_budget_is_never_exceeded(budget):
    pts, ids, y, _ = matrix()
    oracle = Oracle(y)
    out = R.race(len(pts), ids, oracle, R.RaceSettings(budget=budget))
    assert oracle.items <= budget * 1600
    assert out.items_evaluated == oracle.items


def test_budget_below_the_first_round_is_refused_in_one_line():
    pts, ids, y, _ = matrix()
    with pytest.raises(method.SelectionError, match=r"search.budget=4 .* below the race's minimum 5.2"):
        R.race(len(pts), ids, Oracle(y), R.RaceSettings(budget=4))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"delta": 0}, "race_delta"),
        ({"start": 0}, "race_start"),
        ({"growth": 1.0}, "race_growth"),
        ({"finalists": 0}, "race_finalists"),
        ({"budget": -1}, "search.budget"),
        ({"keep": 0}, "race_keep"),
    ],
)
def test_bad_settings_are_one_clear_line(kw, message):
    with pytest.raises(method.SelectionError, match=message):
        R.RaceSettings(**kw).check()


def test_category_weights_define_the_objective():
    """Unequal category sizes: the full-split objective is the mean of category means (or sum_c a_c mean_c)."""
    ids = {"big": [str(i) for i in range(100)], "small": [str(i) for i in range(10)]}
    y = {
        0: {"big": {i: 1.0 for i in ids["big"]}, "small": {i: 0.0 for i in ids["small"]}},
        1: {"big": {i: 0.0 for i in ids["big"]}, "small": {i: 1.0 for i in ids["small"]}},
    }
    out = R.race(2, ids, Oracle(y), R.RaceSettings())
    assert out.scores["overall"] == pytest.approx(0.5)  # not the item mean (100/110 for point 0)
    out = R.race(2, ids, Oracle(y), R.RaceSettings(), {"big": 0.2, "small": 0.8})
    assert out.best == 1 and out.scores["overall"] == pytest.approx(0.8)
    with pytest.raises(method.SelectionError, match="no coefficient for category 'small'"):
        R.race(2, ids, Oracle(y), R.RaceSettings(), {"big": 1.0})


def test_one_point_is_one_full_evaluation():
    ids = {"a": [str(i) for i in range(20)]}
    oracle = Oracle({0: {"a": {i: 1.0 for i in ids["a"]}}})
    out = R.race(1, ids, oracle, R.RaceSettings())
    assert out.best == 0 and out.items_evaluated == 20 and len(oracle.calls) == 1


def test_a_missing_item_score_is_one_clear_error():
    ids = {"a": [str(i) for i in range(20)]}
    with pytest.raises(method.SelectionError, match="point 0: item evaluation returned no score"):
        R.race(4, ids, lambda p, items: {"a": {}}, R.RaceSettings())


# --- end to end, on the real (small) demo through the job: SoupEvaluator, lm-eval, the item cache ---

RACE_JOB = [
    "strategy=soce_weighted",
    "search=race",
    "debug=fast",
    "selection.tau=1.0",
    "selection.max_experts=3",
    "search.step=0.2",
    "search.min_weight=0.2",
    "save_soup=false",
]


def _race_job(tmp_path, tiny_demo_root, name):
    from soce.job.pipeline import run
    from soce.job.preflight import compose_config

    cfg = compose_config([*RACE_JOB, f"paths.root_dir={tmp_path / name}", f"demo.root={tiny_demo_root}"])
    return run(cfg, tmp_path / name / "job")


def _item_files(root):
    return {p: p.stat().st_size for p in (root / "outputs" / "cache" / "items").rglob("*.jsonl")}


@pytest.mark.slow
def test_race_job_on_the_demo_spends_items_and_resumes_from_the_item_cache(tmp_path, tiny_demo_root):
    first = _race_job(tmp_path, tiny_demo_root, "a")
    notes = first.search
    n_sel = 8 * 40  # the small demo: 8 categories x 40 dev items
    assert notes["points"] == 7 and 0 < notes["items_evaluated"] < 7 * n_sel
    assert notes["full_split_equivalents"] == pytest.approx(notes["items_evaluated"] / n_sel)
    assert sum(first.weights.values()) == pytest.approx(1.0) and len([w for w in first.weights.values() if w]) == 3
    files = _item_files(tmp_path / "a")
    assert files  # one JSONL per soup raced
    again = _race_job(tmp_path, tiny_demo_root, "a")  # same cache: a repeated (or resumed) race evaluates nothing
    assert _item_files(tmp_path / "a") == files
    assert again.weights == first.weights and again.search["items_evaluated"] == notes["items_evaluated"]


@pytest.mark.slow
def test_race_ignores_the_report_split(tmp_path, tiny_demo_root, monkeypatch):
    """The inversion test for search=race: report-split scores turned upside down move nothing it chooses."""
    from soce.benchmarks import lmeval

    honest = _race_job(tmp_path, tiny_demo_root, "honest")
    original = lmeval.Evaluator.score

    def poisoned(self, model, tokenizer, split, items=None, log_samples=True):
        out = original(self, model, tokenizer, split, items, log_samples)
        if split == self.benchmark.report_split:
            out = {k: (1.0 - v if isinstance(v, float) else v) for k, v in out.items()}
            out["samples"] = {c: [1.0 - x for x in v] for c, v in out.get("samples", {}).items()}
        return out

    monkeypatch.setattr(lmeval.Evaluator, "score", poisoned)
    liar = _race_job(tmp_path, tiny_demo_root, "poisoned")  # its own caches
    assert liar.evaluated > 0
    assert liar.weights == honest.weights and liar.experts == honest.experts
    assert liar.search["items_evaluated"] == honest.search["items_evaluated"]
    assert liar.scores["dev"] == honest.scores["dev"]
    assert liar.scores["test"]["overall"] == pytest.approx(1 - honest.scores["test"]["overall"])
