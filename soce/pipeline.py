"""One job, end to end: score table -> selection -> strategy (search) -> final soup -> report -> MLflow.

``run(cfg, out_dir)`` is a plain function of a resolved config (plain dicts); the Hydra entry point in
``soce.app`` only composes the config and calls it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from soce import __version__, method
from soce.benchmarks import make_evaluator
from soce.benchmarks.lmeval import Benchmark, lm_eval_version, load_model, pick_device, quiet_lm_eval
from soce.config import ConfigError, typed
from soce.scores import (
    ScoreCache,
    model_fingerprint,
    read_score_csv,
    score_table,
    with_population_csv,
    write_json_atomic,
)
from soce.searches import SEARCHES
from soce.selections import SELECTIONS, select
from soce.strategies import STRATEGIES, Context
from soce.tracking import JobTracker, split_metrics

log = logging.getLogger(__name__)




def resolve_pool(cfg: Mapping[str, Any], progress: bool = True) -> tuple[dict[str, str], dict[str, str], dict]:
    """(candidates, population, demo manifest or {}): from the config, or the demo zoo (built on first use)."""
    pool = cfg["pool"]
    if pool["source"] == "demo":
        from soce.demo.zoo import DemoConfig, build_demo

        manifest = build_demo(DemoConfig(**cfg["demo"]), progress=progress)
        unknown = [c for c in cfg["benchmark"]["categories"] if c not in manifest["categories"]]
        if unknown:
            raise ConfigError(f"benchmark category {unknown[0]!r} is not in the demo zoo "
                              f"(it has: {', '.join(manifest['categories'])})")
        return dict(manifest["candidates"]), dict(manifest["population"]), manifest
    return dict(pool["candidates"]), dict(pool["population"]), {}  # pool.source checked by validate()


DTYPES = ("bfloat16", "float16", "float32", "float64")  # what soups are evaluated and written in (dtype=)


def validate(cfg: Mapping[str, Any]) -> None:
    """Checks that need more than types; raises ConfigError before anything is written."""
    b, s, sel = cfg["benchmark"], cfg["strategy"], cfg["selection"]
    if s["name"] not in STRATEGIES:
        raise ConfigError(f"unknown strategy {s['name']!r}; available: {', '.join(sorted(STRATEGIES))}")
    if not b["categories"]:
        raise ConfigError(f"benchmark {b['name']!r} lists no categories")
    if len(set(b["categories"])) != len(b["categories"]):
        raise ConfigError(f"benchmark {b['name']!r} lists a category twice")
    if "{category}" not in b["task"]:
        raise ConfigError(f"benchmark.task {b['task']!r} must contain {{category}}")
    if sel["tie_break"] not in method.TIE_BREAKS:
        raise ConfigError(
            f"selection.tie_break must be one of {', '.join(method.TIE_BREAKS)}, got {sel['tie_break']!r}")
    if not 0 <= sel["tau"] <= 1:
        raise ConfigError(f"selection.tau must be in [0, 1], got {sel['tau']}")
    if sel["method"] not in SELECTIONS:
        raise ConfigError(f"selection.method must be one of {', '.join(SELECTIONS)}, got {sel['method']!r}")
    if sel["max_experts"] is not None and sel["max_experts"] < 1:
        raise ConfigError(f"selection.max_experts must be >= 1, got {sel['max_experts']}")
    if cfg["search"]["name"] not in SEARCHES:
        raise ConfigError(f"unknown search {cfg['search']['name']!r}; available: {', '.join(SEARCHES)}")
    if cfg["search"]["n_trials"] < 1:
        raise ConfigError(f"search.n_trials must be >= 1, got {cfg['search']['n_trials']}")
    try:
        method.weight_grid(1, cfg["search"]["step"], cfg["search"]["min_weight"])
    except method.SelectionError as e:
        raise ConfigError(str(e)) from None
    if s["name"] == "fixed":
        names, ws = list(s.get("ingredients") or []), list(s.get("weights") or [])
        if not names or len(names) != len(ws) or min(ws) < 0 or sum(ws) <= 0:
            raise ConfigError(f"strategy=fixed needs strategy.ingredients=[...] and as many non-negative "
                              f"strategy.weights=[...] (not all 0); got {names} / {ws}")
    if cfg["dtype"] is not None and cfg["dtype"] not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} or null, got {cfg['dtype']!r}")
    if cfg["device"] != "auto":
        import torch

        try:
            kind = torch.device(cfg["device"]).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg['device']!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={cfg['device']}: no CUDA device here (use device=auto or cpu)")
    pool = cfg["pool"]
    from soce.demo.zoo import PRESETS

    if pool["source"] == "demo" and cfg["demo"]["preset"] not in PRESETS:
        raise ConfigError(f"demo.preset must be one of {', '.join(PRESETS)}, got {cfg['demo']['preset']!r}")
    if pool["source"] not in ("paths", "demo", "csv"):
        raise ConfigError(f"pool.source must be 'paths', 'demo' or 'csv', got {pool['source']!r}")
    for key, path in (("pool.csv", pool["csv"]), ("selection.population_csv", sel["population_csv"])):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{key}: no file {path}")
    if pool["source"] == "csv":
        if pool["csv"] is None:
            raise ConfigError("pool.source=csv needs pool.csv=<score table>")
        if STRATEGIES[s["name"]].evaluates:
            no_eval = [n for n, st in STRATEGIES.items() if not st.evaluates]
            raise ConfigError(f"strategy {s['name']!r} evaluates soups and needs checkpoints; with pool.source=csv "
                              f"use one of {', '.join(no_eval)}")
        cats = list(read_score_csv(pool["csv"])[0].columns)
        if sel["population_csv"]:
            read_score_csv(sel["population_csv"], cats)
    if pool["source"] == "paths":
        if not pool["candidates"]:
            raise ConfigError(f"pool {pool['name']!r} lists no candidates")
        for name, path in {**pool["candidates"], **pool["population"]}.items():
            if str(path).startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
                raise ConfigError(f"pool {pool['name']!r}: checkpoint {name!r} not found at {path}")


@dataclass
class Prepared:
    """Everything up to the selection (Algorithm 1 steps 1-2), shared by jobs and the sweep planner."""

    bench: Benchmark
    device: str
    dtype: str | None
    evaluator: Any
    cache: ScoreCache
    fps: dict[str, str]
    context: dict[str, Any]
    candidates: dict[str, str]
    cand_scores: dict[str, dict[str, dict[str, Any]]]  # split -> candidate -> scores
    cand_table: pd.DataFrame  # selection split, categories only
    pop_table: pd.DataFrame
    selection: Any


def prepare(cfg: Mapping[str, Any]) -> Prepared:
    """Resolve the pool (build the demo if needed), score candidates and population (cached), select."""
    quiet_lm_eval()
    progress = bool(cfg.get("progress", True))
    candidates, population, demo = resolve_pool(cfg, progress)
    bcfg = dict(cfg["benchmark"])
    if demo:
        bcfg["task_dir"] = bcfg.get("task_dir") or demo["task_dir"]
        demo_families = {c: f for c, f in demo["families"].items() if c in bcfg["categories"]}
        bcfg["families"] = bcfg.get("families") or demo_families
    bench = dataclasses.replace(typed(cfg).benchmark, task_dir=bcfg.get("task_dir"),
                                families=bcfg.get("families") or {})
    if bench.select_split == bench.report_split:
        log.warning("select_split == report_split (%s): experts and weights are chosen on the scores "
                    "that are reported (the paper's protocol); reported gains are optimistic", bench.select_split)
    device = pick_device(cfg["device"])
    dtype = cfg.get("dtype")
    evaluator = make_evaluator(bench, device)
    cache = ScoreCache(Path(cfg["paths"]["cache_dir"]))
    fps = {name: model_fingerprint(p) for name, p in {**population, **candidates}.items()}
    context = {"benchmark": evaluator.fingerprint(), "metric": bench.metric, "dtype": dtype,
               "device": device.split(":")[0], "lm_eval": lm_eval_version(), "format": 2}

    def scores_of(name: str, path: str, split: str) -> dict[str, float]:
        key = cache.key({name: 1.0}, fps, {**context, "split": split})

        def compute() -> dict[str, float]:
            model, tok = load_model(path, device, dtype)
            return evaluator.score(model, tok, split)

        return cache.get_or_compute(key, compute)

    sel_split = bench.select_split
    everyone = {**population, **candidates}
    log.info("scoring %d checkpoints on %s (cached after the first run)", len(everyone), sel_split)
    cand_scores = {s: {n: scores_of(n, p, s) for n, p in candidates.items()} for s in bench.splits}
    pop_scores = {n: scores_of(n, p, sel_split) for n, p in _progress(everyone.items(), progress, "population")}
    cats = bench.categories
    cand_table = score_table(cand_scores[sel_split], cats)[cats]
    pop_table = score_table(pop_scores, cats)[cats]
    pop_table = with_population_csv(pop_table, cfg["selection"]["population_csv"], cats)

    selection = select(pop_table, cand_table, typed(cfg).selection)
    log.info("L = %s; experts = %s", selection.weak, selection.ingredients)
    return Prepared(bench, device, dtype, evaluator, cache, fps, context, candidates, cand_scores, cand_table,
                    pop_table, selection)



def run(cfg: Mapping[str, Any], out_dir: str | Path, parent_run_id: str | None = None,
        job_key: str | None = None) -> dict[str, Any]:
    """Run one job; write ``result.json`` (and the soup) into ``out_dir``; return the result dict.

    ``job_key`` identifies the job within its sweep: an interrupted job with the same key is resumed in
    MLflow (same run, missing search points only); evaluations are resumed through the score cache."""
    validate(cfg)
    out_dir = Path(out_dir)
    if cfg["pool"]["source"] == "csv":
        return run_scores_only(cfg, out_dir, parent_run_id, job_key)
    t0 = time.time()
    p = prepare(cfg)
    tracker = JobTracker.start(
        cfg["tracking"]["uri"], cfg["tracking"]["experiment"], cfg["tracking"]["artifact_location"],
        name=cfg["strategy"]["name"], parent_run_id=parent_run_id,
        tags={"soce.kind": "job", "soce.version": __version__}, job_key=job_key,
    )
    try:
        result = _run_job(cfg, out_dir, p, tracker)
        result["seconds"] = round(time.time() - t0, 1)
        write_json_atomic(out_dir / "result.json", result)
        tracker.log_artifact(out_dir / "result.json")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return result


def _run_job(cfg: Mapping[str, Any], out_dir: Path, p: Prepared, tracker: JobTracker) -> dict[str, Any]:
    """Algorithm 1 steps 3-4 for the configured strategy, then the final soup, its scores and the logs."""
    from soce.soup import Remixer, write_soup

    bench, evaluator, cache, fps, context = p.bench, p.evaluator, p.cache, p.fps, p.context
    candidates, cand_scores, cand_table, pop_table = p.candidates, p.cand_scores, p.cand_table, p.pop_table
    selection, device, dtype = p.selection, p.device, p.dtype
    sel_split = bench.select_split
    strategy = cfg["strategy"]["name"]
    remixers: dict[tuple[str, ...], Any] = {}
    timings: list[tuple[float, float]] = []  # (re-mix seconds, evaluation seconds) per soup evaluated
    tokenizers: list[Any] = []

    def tokenizer() -> Any:  # ingredients share one base, hence one tokenizer: the donor's (first candidate)
        if not tokenizers:
            from transformers import AutoTokenizer

            tokenizers.append(AutoTokenizer.from_pretrained(next(iter(candidates.values()))))
        return tokenizers[0]

    def evaluate_weights(weights: dict[str, float], split: str) -> dict[str, float]:
        live = {k: v for k, v in weights.items() if v > 0}
        key = cache.key(live, fps, {**context, "split": split})

        def compute() -> dict[str, float]:
            resident = next(iter(remixers), ())
            if not set(live) <= set(resident):  # (re)load the experts, growing the resident set
                names = tuple(n for n in candidates if n in live or n in resident)
                remixers.clear()
                remixers[names] = Remixer({n: candidates[n] for n in names}, device=device, dtype=dtype)
                resident = names
            t0 = time.perf_counter()
            model = remixers[resident].mix(live)
            _sync(device)
            t1 = time.perf_counter()
            scores = evaluator.score(model, tokenizer(), split)
            timings.append((t1 - t0, time.perf_counter() - t1))
            return scores

        return cache.get_or_compute(key, compute)

    shown: dict[str, Any] = {"bar": None, "best": 0.0}  # one progress bar over the soups of a search

    def on_point(i: int, weights: dict[str, float], scores: dict[str, float]) -> None:
        tracker.log_point(i, weights, scores, sel_split)
        if cfg.get("progress", True):
            if shown["bar"] is None:
                from tqdm.auto import tqdm

                shown["bar"] = tqdm(desc=f"{strategy}: soups on {sel_split}", unit="soup", leave=False)
            shown["best"] = max(shown["best"], scores["overall"])
            shown["bar"].set_postfix(best=f"{100 * shown['best']:.2f}%", refresh=False)
            shown["bar"].update(1)

    ctx = Context(cand_table, selection, typed(cfg).search,
                  lambda w: _categories(evaluate_weights(w, sel_split), bench.categories), on_point,
                  params=typed(cfg).strategy)
    try:
        plan = STRATEGIES[strategy].plan(ctx)
    except method.SelectionError as e:
        raise ConfigError(str(e)) from None
    weights = {n: float(plan.weights.get(n, 0.0)) for n in candidates}
    ingredients = {n: w for n, w in weights.items() if w > 0}

    # the final soup, written atomically as a Hugging Face checkpoint, and scored on every split
    recipe = {"strategy": strategy, "benchmark": bench.name, "pool": cfg["pool"]["name"],
              "weights": ingredients, "soce_version": __version__}
    soup_path = None
    if cfg.get("save_soup", True):
        soup_path = write_soup({n: candidates[n] for n in ingredients}, ingredients, out_dir / "soup",
                               overwrite=True, recipe=recipe)
    splits = bench.splits if cfg.get("report", True) else [sel_split]
    scores = {s: _summary(evaluate_weights(ingredients, s)) for s in splits}
    best = method.overall(cand_table).idxmax()
    analysis_metrics, analysis_summary = {}, {}
    if any(cfg["analysis"][k] for k in ("shapley", "consistency", "emergent")):
        from soce.analyses import run_analyses

        analysis_metrics, analysis_summary = run_analyses(
            cfg["analysis"], candidates=list(candidates), ingredients=ingredients, evaluate=evaluate_weights,
            population=pop_table, trace=plan.trace, categories=bench.categories, select_split=sel_split,
            report_split=bench.report_split, out_dir=out_dir / "artifacts")

    # artifacts: score table, correlation heatmap, search trace, recipe, resolved config
    from soce.plots import correlation_heatmap

    art = out_dir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    table = pd.concat({s: score_table(cand_scores[s], bench.categories) for s in bench.splits}, names=["split"])
    table.to_csv(art / "candidate_scores.csv")
    pop_table.to_csv(art / "population_scores.csv")
    selection.correlation.to_csv(art / "correlation.csv")
    correlation_heatmap(selection.correlation, art / "correlation.png",
                        title=f"{bench.name}: category correlation across {len(pop_table)} models ({sel_split})")
    if plan.trace is not None:
        plan.trace.to_csv(art / "search_trace.csv", index=False)
    (art / "recipe.yaml").write_text(yaml.safe_dump(
        {**recipe, "experts": selection.experts, "weak_set": selection.weak, "tau": cfg["selection"]["tau"],
         "select_split": sel_split, "candidates": dict(candidates)}, sort_keys=False))
    (art / "config.yaml").write_text(yaml.safe_dump(_jsonable(cfg), sort_keys=False))
    for f in sorted(art.iterdir()):
        tracker.log_artifact(f)

    params = {"strategy": strategy, "pool": cfg["pool"]["name"], "benchmark": bench.name,
              "tau": cfg["selection"]["tau"], "tie_break": cfg["selection"]["tie_break"],
              "selection_method": cfg["selection"]["method"], "max_experts": cfg["selection"]["max_experts"],
              "search": cfg["search"]["name"], "categories": ",".join(bench.categories),
              "select_split": sel_split, "report_split": bench.report_split,
              "experts": ",".join(selection.ingredients), "weak_set": ",".join(selection.weak),
              "best_single": best, **{f"w.{n}": w for n, w in weights.items()}}
    metrics = {**split_metrics(scores),
               **split_metrics({s: _summary(cand_scores[s][best]) for s in bench.splits}, prefix="best_single."),
               **analysis_metrics}
    if plan.trace is not None:
        metrics["search.points"] = len(plan.trace)
    timing = _timing_summary(timings)
    metrics.update({f"timing.{k}": v for k, v in timing.items()})
    tracker.log(params, metrics)

    return {
        "strategy": strategy,
        "benchmark": bench.name,
        "pool": cfg["pool"]["name"],
        "experts": selection.ingredients,
        "weak_set": selection.weak,
        "expert_of": selection.experts,
        "categories": bench.categories,
        "families": bench.families,
        "select_split": sel_split,
        "report_split": bench.report_split,
        "correlation": _matrix(selection.correlation),
        "weights": weights,
        "scores": scores,
        "candidate_scores": {n: {s: _summary(cand_scores[s][n]) for s in bench.splits} for n in candidates},
        "best_single": best,
        "soup_path": str(soup_path) if soup_path else None,
        "mlflow_run_id": tracker.run_id,
        "evaluated": cache.evaluated,
        "cached": cache.cached,
        "timing": timing,
        "analysis": analysis_summary,
    }






def run_scores_only(cfg: Mapping[str, Any], out_dir: Path, parent_run_id: str | None,
                    job_key: str | None = None) -> dict[str, Any]:
    """Selection from a score table alone (pool.source=csv): no model is loaded or needed.

    Categories are the table's columns. Writes result.json (L, experts, weights, correlation) and logs it;
    if the table has a ``path`` column and ``save_soup`` is set, the chosen soup is also written."""
    table, paths = read_score_csv(cfg["pool"]["csv"])
    cats = list(table.columns)
    population = with_population_csv(table, cfg["selection"]["population_csv"], cats)
    sc, strategy = cfg["selection"], cfg["strategy"]["name"]
    try:
        selection = select(population, table, typed(cfg).selection)
    except method.SelectionError as e:
        raise ConfigError(str(e)) from None
    plan = STRATEGIES[strategy].plan(Context(table, selection, typed(cfg).search, _no_evaluation))
    weights = {m: float(plan.weights.get(m, 0.0)) for m in table.index}
    split = cfg["benchmark"]["select_split"]
    tracker = JobTracker.start(cfg["tracking"]["uri"], cfg["tracking"]["experiment"],
                               cfg["tracking"]["artifact_location"], name=strategy, parent_run_id=parent_run_id,
                               tags={"soce.kind": "job", "soce.version": __version__, "soce.scores_only": "true"},
                               job_key=job_key)
    try:
        soup_path = None
        ingredients = {m: w for m, w in weights.items() if w > 0}
        if paths and cfg.get("save_soup", True) and all(m in paths for m in ingredients):
            from soce.soup import write_soup

            soup_path = write_soup({m: paths[m] for m in ingredients}, ingredients, out_dir / "soup", overwrite=True,
                                   recipe={"strategy": strategy, "pool": cfg["pool"]["name"], "weights": ingredients})
        art = out_dir / "artifacts"
        art.mkdir(parents=True, exist_ok=True)
        table.to_csv(art / "candidate_scores.csv")
        selection.correlation.to_csv(art / "correlation.csv")
        from soce.plots import correlation_heatmap

        correlation_heatmap(selection.correlation, art / "correlation.png",
                            title=f"category correlation across {len(population)} models")
        result = {
            "strategy": strategy, "benchmark": cfg["benchmark"]["name"], "pool": cfg["pool"]["name"],
            "experts": selection.ingredients, "weak_set": selection.weak, "expert_of": selection.experts,
            "weights": weights, "scores": {},
            "candidate_scores": {m: {split: {**table.loc[m].to_dict(), "overall": float(table.loc[m].mean())}}
                                 for m in table.index},
            "correlation": _matrix(selection.correlation),
            "soup_path": str(soup_path) if soup_path else None,
            "mlflow_run_id": tracker.run_id, "evaluated": 0, "cached": 0,
        }
        write_json_atomic(out_dir / "result.json", result)
        tracker.log({"strategy": strategy, "pool": cfg["pool"]["name"], "benchmark": cfg["benchmark"]["name"],
                     "tau": sc["tau"], "tie_break": sc["tie_break"], "selection_method": sc["method"],
                     "experts": ",".join(selection.ingredients), "weak_set": ",".join(selection.weak),
                     **{f"w.{m}": w for m, w in weights.items()}}, {"population.size": len(population)})
        for f in [*sorted(art.iterdir()), out_dir / "result.json"]:
            tracker.log_artifact(f)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return result


def _matrix(df: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """A correlation matrix as nested dicts, NaN as None (JSON has no NaN)."""
    return {c: {k: (None if pd.isna(v) else float(v)) for k, v in row.items()}
            for c, row in df.to_dict("index").items()}


def _no_evaluation(weights: dict[str, float]) -> dict[str, float]:
    raise ConfigError("this strategy evaluates soups; a score table alone cannot")


def _summary(scores: Mapping[str, Any]) -> dict[str, float]:
    """Category scores and overall, without the per-item results."""
    return {k: v for k, v in scores.items() if k != "samples"}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timing_summary(timings: list[tuple[float, float]]) -> dict[str, float]:
    """Median re-mix and evaluation seconds per soup evaluated in memory, and their ratio."""
    if not timings:
        return {}
    mix = sorted(t[0] for t in timings)
    ev = sorted(t[1] for t in timings)
    mid = len(timings) // 2
    return {"soups": len(timings), "mix_s_median": round(mix[mid], 5), "eval_s_median": round(ev[mid], 4),
            "mix_over_eval": round(mix[mid] / ev[mid], 5) if ev[mid] else float("nan")}


def _categories(scores: Mapping[str, float], categories: list[str]) -> dict[str, float]:
    return {c: scores[c] for c in categories}


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    items = list(items)
    return tqdm(items, desc=desc, unit="model", leave=False)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
