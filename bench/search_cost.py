"""What a weight search costs (in items evaluated) and what it finds, on the demo: grid, TPE, GP and race.

    python bench/search_cost.py [--seeds 0 1 2] [--preset cpu] [--budget 0.2] [--max-experts N] [--out DIR]
                                [--replay DIR] [Hydra overrides, e.g. demo.device=cuda]

For each demo seed: builds the zoo, selects the experts as a job does (``soce.job.pipeline.prepare``), then
evaluates EVERY grid point once on every selection-split and report-split item (real lm-eval evaluations of
in-memory soups, kept per item in an :class:`soce.search.items.ItemCache` under ``--out``). Each search then runs
against those stored outcomes (replayed real evaluations; a point off the grid, e.g. a TPE proposal, is
evaluated for real the first time it is asked for), on the selection split only, and is charged for the items
it asks for as a fresh run would be. The report split is read after the search, for the chosen soup only.

Searches: ``grid`` (the paper's), ``tpe`` and ``gp`` (optuna, ``--budget`` x grid points trials), ``race``
(grid points) and ``race_tpe`` (optuna proposals), both with ``search.budget = --budget x grid points``.
Prints per seed and per search: items evaluated and their ratio to the grid's, the selection-split score of
the chosen point, the report-split score of the chosen soup (± binomial standard error) and its gap to the
grid's soup; then the projection onto the paper's BFCL 8B setup, and last a JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# BFCL v3, one H200, 8B soup (reference/bfcl-notes.md): single-turn ~10 min, multi-turn ~1 h per full
# evaluation ("1-1.5 GPU-hours"); the paper's 8B setup has 3 experts, a 37-point grid.
BFCL_FULL_EVAL_H = (1.0, 10 / 60 + 1.0, 1.5)  # low, from the per-part figures, high
BFCL_GRID_POINTS = 37


@dataclass
class World:
    """One demo seed: its selection (experts), grid, item ids per split, and the stored per-item outcomes."""

    seed: int
    experts: list[str]
    points: list[tuple[float, ...]]
    item_ids: dict[str, dict[str, list[str]]]  # split -> category -> ids
    select_split: str
    report_split: str
    outcomes: Any  # (weights, split) -> {category: {item_id: score}} over the whole split
    categories: list[str] = field(default_factory=list)
    seen: dict[str, dict] | None = None  # split -> point key -> outcomes evaluated by this run (for dump)


def point_key(experts: list[str], weights: dict[str, float]) -> str:
    """A point as a string (weights in expert order, 4 decimals) for the stored matrices."""
    return ",".join(f"{float(weights.get(n, 0.0)):.4f}" for n in experts)


def dump(world: World, seen: dict[str, dict[str, dict]], path: Path) -> None:
    """Write every per-item outcome the run evaluated (grid and off-grid points, both splits) as gzipped JSON:
    ``--replay`` reruns the searches from it without a model (a point it lacks is an error)."""
    import gzip

    ids = world.item_ids
    blob = {
        "seed": world.seed,
        "experts": world.experts,
        "points": world.points,
        "categories": world.categories,
        "select_split": world.select_split,
        "report_split": world.report_split,
        "item_ids": ids,
        "outcomes": {
            sp: {k: {c: [y[c][i] for i in ids[sp][c]] for c in y} for k, y in got.items()} for sp, got in seen.items()
        },
    }
    with gzip.open(path, "wt") as fh:
        json.dump(blob, fh, separators=(",", ":"))


class NotStored(LookupError):
    """``--replay``: a search asked for a point the stored run never evaluated (rerun without --replay)."""


def load_world(path: Path) -> World:
    """A World from a ``dump`` file: outcomes replayed from the file only."""
    import gzip

    with gzip.open(path, "rt") as fh:
        b = json.load(fh)
    ids = b["item_ids"]
    table = {
        sp: {k: {c: dict(zip(ids[sp][c], v, strict=True)) for c, v in y.items()} for k, y in got.items()}
        for sp, got in b["outcomes"].items()
    }

    def outcomes(weights: dict[str, float], split: str) -> dict[str, dict[str, float]]:
        key = point_key(b["experts"], weights)
        if key not in table[split]:
            raise NotStored(f"{path.name}: point {key} on {split} was not evaluated in the stored run")
        return table[split][key]

    return World(
        b["seed"],
        b["experts"],
        [tuple(p) for p in b["points"]],
        ids,
        b["select_split"],
        b["report_split"],
        outcomes,
        b["categories"],
    )


def build_world(seed: int, preset: str, out: Path, max_experts: int | None, extra: list[str]) -> World:
    """Build the zoo and select the experts as a job does (``soce.job.inputs.gather``, ``select_experts``); the
    per-item outcomes come from the job's own :class:`soce.search.evaluator.SoupEvaluator` and its item cache."""
    from soce import method
    from soce.job.inputs import gather
    from soce.job.pipeline import select_experts
    from soce.job.preflight import compose_config

    overrides = [
        f"demo.seed={seed}",
        f"demo.preset={preset}",
        f"paths.root_dir={out}",
        "progress=false",
        f"demo.root={out / 'demo'}",
    ]
    if max_experts:
        overrides.append(f"selection.max_experts={max_experts}")
    config = compose_config(overrides + extra)
    inputs = gather(config)
    experts = list(select_experts(config, inputs).ingredients)
    s, bench, soups = config.search, inputs.benchmark, inputs.soups
    points = method.weight_grid(len(experts), s.step, s.min_weight, s.include_uniform)
    splits = [bench.select_split, bench.report_split]
    ids = {sp: soups.item_ids(sp) for sp in splits}

    seen: dict[str, dict] = {sp: {} for sp in splits}

    def outcomes(weights: dict[str, float], split: str) -> dict[str, dict[str, float]]:
        """Every item of ``split``: evaluated once for real (in memory), then read from the item cache."""
        from soce.search.searches import item_table

        key = point_key(experts, weights)
        if key not in seen[split]:
            seen[split][key] = item_table(soups.item_scores(weights, split, ids[split]))
        return seen[split][key]

    world = World(seed, experts, points, ids, splits[0], splits[1], outcomes, list(bench.categories))
    world.seen = seen
    return world


class Charged:
    """A search's view of the selection split: whole-split and item evaluations served from the oracle,
    charged per (point, item) as a fresh run would pay them (a repeated point or item is free)."""

    def __init__(self, world: World):
        self.w, self.seen = world, set()

    def _charge(self, weights: dict[str, float], items: dict[str, list[str]]) -> None:
        point = tuple(round(weights[n], 9) for n in self.w.experts)
        self.seen.update((point, c, i) for c, ids in items.items() for i in ids)

    def evaluate(self, weights: dict[str, float]) -> dict[str, float]:
        y = self.w.outcomes(weights, self.w.select_split)
        self._charge(weights, self.w.item_ids[self.w.select_split])
        scores = {c: statistics.fmean(y[c].values()) for c in self.w.categories}
        return {**scores, "overall": statistics.fmean(scores.values())}

    def evaluate_items(self, weights: dict[str, float], items: dict[str, list[str]]) -> dict:
        y = self.w.outcomes(weights, self.w.select_split)
        self._charge(weights, items)
        return {c: {i: y[c][i] for i in ids} for c, ids in items.items()}

    @property
    def items(self) -> int:
        return len(self.seen)


def search_configs(n_points: int, budget: float, seed: int) -> dict[str, Any]:
    """The searches compared, with the budget (``budget`` x grid points full evaluations) where they take one."""
    from soce.config import SearchConfig

    cap = budget * n_points
    trials = max(1, math.floor(cap))
    race = {"name": "race", "min_weight": 0.1, "seed": seed, "budget": cap}
    out = {
        "grid": SearchConfig(name="grid"),
        "tpe": SearchConfig(name="optuna", sampler="tpe", n_trials=trials, seed=seed, min_weight=0.1),
        "gp": SearchConfig(name="optuna", sampler="gp", n_trials=trials, seed=seed, min_weight=0.1),
        "race": SearchConfig(**race),
        "race_tpe": SearchConfig(**race, n_trials=max(trials, n_points // 2)),
    }
    out["race_tpe"].proposal = "tpe"  # SearchConfig.proposal (once the schema declares it)
    return out


def report(world: World, weights: dict[str, float]) -> tuple[float, float, dict[str, dict[str, float]]]:
    """(report-split overall, its binomial standard error, per-item outcomes) of the soup ``weights``."""
    y = world.outcomes(weights, world.report_split)
    k = len(world.categories)
    means = {c: statistics.fmean(y[c].values()) for c in world.categories}
    se = math.sqrt(sum(means[c] * (1 - means[c]) / len(y[c]) for c in world.categories)) / k
    return statistics.fmean(means.values()), se, y


def paired_se(world: World, a: dict, b: dict) -> float:
    """Standard error of the report-split gap between two soups, from their paired per-item differences."""
    k, var = len(world.categories), 0.0
    for c in world.categories:
        d = [a[c][i] - b[c][i] for i in a[c]]
        var += statistics.variance(d) / len(d) if len(d) > 1 else 0.0
    return math.sqrt(var) / k


def run_seed(world: World, budget: float) -> list[dict]:
    """Every search on one seed: its spend and what it found (selection and report split)."""
    from soce.search.searches import SEARCHES, SearchContext

    rows, grid_y = [], None
    full = sum(len(v) for v in world.item_ids[world.select_split].values())
    for name, cfg in search_configs(len(world.points), budget, world.seed).items():
        ch = Charged(world)
        ctx = SearchContext(
            world.experts, ch.evaluate, cfg, None, ch.evaluate_items, world.item_ids[world.select_split]
        )
        try:
            res = SEARCHES[cfg.name].run(ctx)
            rep, se, y = report(world, res.weights)
        except NotStored as e:  # --replay: e.g. optuna proposed other points on this machine's numerics
            print(f"seed {world.seed}, {name}: skipped ({e}; rerun without --replay)", flush=True)
            continue
        grid_y = y if name == "grid" else grid_y
        rows.append(
            {
                "seed": world.seed,
                "search": name,
                "items": ch.items,
                "items_ratio": ch.items / (len(world.points) * full),
                "points": res.notes.get("points"),
                "select": res.scores["overall"],
                "report": rep,
                "report_se": se,
                "gap_se": paired_se(world, y, grid_y),
                "weights": res.weights,
            }
        )
    g = next(r for r in rows if r["search"] == "grid")
    for r in rows:
        r["test_gap"] = 100 * (r["report"] - g["report"])
    return rows


def race_spread(world: World, budget: float, n_orders: int) -> dict:
    """The race (grid points) under ``n_orders`` item orders (race seeds 0..n-1): how its test gap to the grid
    varies with which items it happens to draw first; replayed, so free."""
    from soce.search.searches import SEARCHES, SearchContext

    g = report(world, grid_pick(world))
    gaps, ratios = [], []
    full = len(world.points) * sum(len(v) for v in world.item_ids[world.select_split].values())
    for s in range(n_orders):
        cfg = search_configs(len(world.points), budget, s)["race"]
        ch = Charged(world)
        res = SEARCHES["race"].run(
            SearchContext(world.experts, ch.evaluate, cfg, None, ch.evaluate_items, world.item_ids[world.select_split])
        )
        gaps.append(100 * (report(world, res.weights)[0] - g[0]))
        ratios.append(ch.items / full)
    return {
        "seed": world.seed,
        "orders": n_orders,
        "mean_gap": statistics.fmean(gaps),
        "worst_gap": min(gaps),
        "worst_gap_in_se": min(gaps) / (100 * g[1]),
        "max_ratio": max(ratios),
        "share_within_1se": sum(x >= -100 * g[1] for x in gaps) / n_orders,
    }


def grid_pick(world: World) -> dict[str, float]:
    """The grid's choice on the selection split (ties: the earlier point), from the stored outcomes."""

    def overall(pt: tuple[float, ...]) -> float:
        y = world.outcomes(dict(zip(world.experts, pt, strict=True)), world.select_split)
        return statistics.fmean(statistics.fmean(y[c].values()) for c in world.categories)

    best = max(world.points, key=overall)  # max keeps the first of equal values
    return dict(zip(world.experts, best, strict=True))


def tables(rows: list[dict], n_points: dict[int, int], budget: float) -> str:
    """Markdown: one row per (seed, search), then the mean over seeds with the BFCL 8B projection."""
    lines = [
        "Figures from replayed real evaluations: every grid point was evaluated once per seed on every item "
        "(lm-eval, in-memory soups); each search is charged for the items it asks for.",
        "",
        "| seed | search | points | items | items / grid | selection overall | report overall ± s.e. "
        "| gap to grid (points) ± paired s.e. | weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = ", ".join(f"{v:.2f}" for v in r["weights"].values())
        lines.append(
            f"| {r['seed']} | {r['search']} | {r['points']} | {r['items']} | {r['items_ratio']:.3f} | "
            f"{100 * r['select']:.2f} | {100 * r['report']:.2f} ± {100 * r['report_se']:.2f} | "
            f"{r['test_gap']:+.2f} ± {100 * r['gap_se']:.2f} | {w} |"
        )
    lo, mid, hi = BFCL_FULL_EVAL_H
    lines += [
        "",
        f"Mean over seeds {sorted(n_points)} (grid points per seed: {list(n_points.values())}; budget "
        f"{budget:g} x grid). BFCL 8B: items / grid x {BFCL_GRID_POINTS} points x {lo:g}-{hi:g} GPU-h "
        "per full evaluation (proportional stratified subsets: the fraction of items is the fraction of "
        "cost in every category, single- and multi-turn alike).",
        "",
        "| search | items / grid | test gap, mean (per seed) | min gap in s.e. of grid's report | "
        "selection overall | report overall ± s.e. | BFCL 8B GPU-h |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary(rows).items():
        lines.append(
            f"| {name} | {s['items_ratio']:.3f} | {s['test_gap']:+.2f} "
            f"({', '.join(f'{g:+.2f}' for g in s['test_gap_per_seed'])}) | {s['worst_gap_in_se']:+.2f} | "
            f"{100 * s['select']:.2f} | {100 * s['report']:.2f} ± {100 * s['report_se']:.2f} | "
            f"{s['bfcl_8b_gpu_h'][1]:.1f} ({s['bfcl_8b_gpu_h'][0]:.1f}-{s['bfcl_8b_gpu_h'][2]:.1f}) |"
        )
    return "\n".join(lines)


def spread_table(spread: list[dict]) -> str:
    """Markdown: the race's test gap over many item orders, per demo seed."""
    if not spread:
        return ""
    lines = [
        "",
        "",
        f"The race (grid points) over {spread[0]['orders']} item orders (search.seed 0..n-1) per demo seed, replayed:",
        "",
        "| demo seed | mean gap (points) | worst gap | worst gap in s.e. | share within 1 s.e. | max items / grid |",
        "|---|---|---|---|---|---|",
    ]
    for s in spread:
        lines.append(
            f"| {s['seed']} | {s['mean_gap']:+.2f} | {s['worst_gap']:+.2f} | {s['worst_gap_in_se']:+.2f} | "
            f"{100 * s['share_within_1se']:.0f}% | {s['max_ratio']:.3f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per search, means over seeds: items_ratio, test_gap (points), and what the table shows."""
    out = {}
    grid = {r["seed"]: r for r in rows if r["search"] == "grid"}
    for name in dict.fromkeys(r["search"] for r in rows):
        rs = [r for r in rows if r["search"] == name]
        ratio = statistics.fmean(r["items_ratio"] for r in rs)
        out[name] = {
            "items_ratio": round(ratio, 4),
            "test_gap": round(statistics.fmean(r["test_gap"] for r in rs), 3),
            "test_gap_per_seed": [round(r["test_gap"], 3) for r in rs],
            "worst_gap_in_se": round(min(r["test_gap"] / (100 * grid[r["seed"]]["report_se"]) for r in rs), 3),
            "select": statistics.fmean(r["select"] for r in rs),
            "report": statistics.fmean(r["report"] for r in rs),
            "report_se": math.sqrt(sum(r["report_se"] ** 2 for r in rs)) / len(rs),
            "bfcl_8b_gpu_h": [round(ratio * BFCL_GRID_POINTS * h, 1) for h in BFCL_FULL_EVAL_H],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--budget", type=float, default=0.2, help="search.budget as a fraction of the grid's points")
    ap.add_argument("--max-experts", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "search_cost"))
    ap.add_argument("--replay", default=None, help="a folder of matrices_seed<S>.json.gz from an earlier run")
    ap.add_argument("--race-orders", type=int, default=20, help="item orders (race seeds) for the race's spread")
    args, extra = ap.parse_known_args()  # the rest: Hydra overrides for the jobs (e.g. demo.device=cuda)
    from soce.benchmarks.lmeval import quiet_lm_eval

    quiet_lm_eval()
    out = Path(args.out).resolve() / f"{args.preset}" / (f"max{args.max_experts}" if args.max_experts else "all")
    out.mkdir(parents=True, exist_ok=True)
    rows, n_points, spread = [], {}, []
    for seed in args.seeds:
        if args.replay:
            world = load_world(Path(args.replay) / f"matrices_seed{seed}.json.gz")
        else:
            world = build_world(seed, args.preset, out, args.max_experts, extra)
            for pt in world.points:  # the grid, evaluated once on every item of both splits (then replayed)
                for split in (world.select_split, world.report_split):
                    world.outcomes(dict(zip(world.experts, pt, strict=True)), split)
        n_points[seed] = len(world.points)
        print(f"seed {seed}: experts {world.experts}, {len(world.points)} grid points evaluated", flush=True)
        rows += run_seed(world, args.budget)
        if args.race_orders:
            spread.append(race_spread(world, args.budget, args.race_orders))
        if world.seen is not None:
            dump(world, world.seen, out / f"matrices_seed{seed}.json.gz")
    md = tables(rows, n_points, args.budget) + spread_table(spread)
    (out / "summary.md").write_text(md + "\n")
    print(md)
    last = {k: {"items_ratio": v["items_ratio"], "test_gap": v["test_gap"]} for k, v in summary(rows).items()}
    print(json.dumps(last))


if __name__ == "__main__":
    main()
