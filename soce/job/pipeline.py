"""One job, as the paper's data flow: config -> scores -> selection -> search -> soup -> tracking.

``run(config, out_dir)`` is a plain function of the typed config (``soce.config.Config``; plain dicts are
converted once, here); ``soce.app`` only composes the config with Hydra and calls it. The scores-only mode
(``pool.source=csv``) is the same recipe with the score table read from a file and no soup evaluated.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from soce import method
from soce.config import Config, ConfigError, typed
from soce.job import outputs
from soce.job.inputs import Inputs, gather
from soce.job.outputs import JobResult
from soce.job.preflight import check_experts, validate
from soce.job.strategies import STRATEGIES, Context, Plan
from soce.search.searches import SEARCHES
from soce.search.selections import Selection, select
from soce.tracking.naming import JobName
from soce.tracking.runs import JobTracker
from soce.tracking.store import client

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "JobResult", "run", "validate"]


def run(
    cfg: Config | Mapping[str, Any], out_dir: str | Path, parent_run_id: str | None = None, name: JobName | None = None
) -> JobResult:
    """Run one job; write ``result.json`` (and the soup) into ``out_dir``.

    ``name`` (:func:`soce.tracking.naming.job_name`; default: the strategy's name) is the job's one name: its
    key identifies the job within its sweep, so an interrupted job with the same key is resumed in MLflow
    (same run, missing search points only; evaluations resume through the score cache); its label names the
    MLflow run, the report row and ``result.json``; its overrides are logged as a tag."""
    config = cfg if isinstance(cfg, Config) else typed(cfg)
    validate(config)
    out_dir, t0 = Path(out_dir), time.time()
    inputs = gather(config)  # score tables (cached), Algorithm 1's input
    selection = select_experts(config, inputs)  # steps 1-2: correlation, L, experts
    name = name or JobName(config.strategy.name)
    tracker = outputs.start_tracker(config, inputs, parent_run_id, name)
    with finished_or_failed(tracker):
        plan = plan_soup(config, inputs, selection, tracker)  # step 3: the strategy (and its weight search)
        soup_path = outputs.write_final_soup(config, inputs, plan, out_dir)  # step 4: the soup on disk
        result = make_result(config, inputs, selection, plan, soup_path, tracker)
        result.label = name.label
        analysis_metrics, result.analysis = outputs.analyses(config, inputs, plan, result, out_dir)
        result.seconds = round(time.time() - t0, 1)
        outputs.record(tracker, config, inputs, selection, plan, result, out_dir, analysis_metrics)
        if parent_run_id is None:  # a sweep logs its baselines once, under its parent (soce.job.callbacks)
            outputs.log_baselines_of(tracker, result)
    return result


def select_experts(config: Config, inputs: Inputs) -> Selection:
    """Algorithm 1 steps 1-2 on the selection split; a selection that cannot be made is a ConfigError."""
    try:
        selection = select(inputs.population, inputs.table(inputs.benchmark.select_split), config.selection)
    except method.SelectionError as e:
        raise ConfigError(str(e)) from None
    if STRATEGIES[config.strategy.name].selects:
        log.info("selection: %s", selection.describe())
        if len(selection.ingredients) == 1 and config.strategy.name in ("soce_selected", "soce_weighted"):
            log.warning(
                "every category in L picks %s: the soup collapses to that one model (no weights to search)",
                selection.ingredients[0],
            )
        check_experts(config, selection.ingredients)
    else:
        log.info("strategy %s uses no selection (experts are not its ingredients)", config.strategy.name)
    return selection


def plan_soup(config: Config, inputs: Inputs, selection: Selection, tracker: JobTracker) -> Plan:
    """Run the configured strategy on the selection split; every soup it evaluates is logged as a point."""
    bench, sel = inputs.benchmark, inputs.benchmark.select_split
    soups = inputs.soups
    total = outputs.expected_points(config, len(selection.ingredients))
    progress = outputs.SearchProgress(config.strategy.name, sel, config.progress, total)

    def on_point(i: int, weights: dict[str, float], scores: dict[str, float]) -> None:
        tracker.log_point(i, weights, scores, sel)
        progress.update(scores)

    def evaluate(weights: dict[str, float]) -> dict[str, float]:
        if soups is None:
            raise ConfigError("this strategy evaluates soups; a score table alone cannot")
        return objective_scores(soups.scores(weights, sel), bench)

    evaluate_items = None if soups is None else (lambda w, items: soups.item_scores(w, sel, items))
    needs_items = STRATEGIES[config.strategy.name].evaluates and SEARCHES[config.search.name].needs_items
    item_ids = soups.item_ids(sel) if soups is not None and needs_items else None
    workers = _workers(config, soups)
    evaluate_many = None
    if workers:

        def evaluate_many(points: list[dict[str, float]]) -> list[dict[str, float]]:
            return [objective_scores(s, bench) for s in soups.scores_many(points, sel, workers)]

    ctx = Context(
        inputs.table(sel),
        selection,
        config.search,
        evaluate,
        on_point,
        config.strategy,
        evaluate_items,
        item_ids,
        evaluate_many,
    )
    try:
        return STRATEGIES[config.strategy.name].plan(ctx)
    except method.SelectionError as e:
        raise ConfigError(str(e)) from None
    finally:
        progress.close()
        for w in workers or []:  # free the other workers' experts (the job's own stay for the final soup)
            if w is not soups:
                w._remixer = None


def _workers(config: Config, soups: Any) -> list[Any] | None:
    """One in-memory evaluator per GPU (group) when ``parallel.workers > 1``; None: serial."""
    if soups is None or config.parallel.workers <= 1 or not STRATEGIES[config.strategy.name].evaluates:
        return None
    from soce.benchmarks import make_evaluator
    from soce.search.evaluator import on_devices

    par = config.parallel
    workers = on_devices(
        soups, par.workers, lambda d: make_evaluator(soups.evaluator.benchmark, d), par.gpus_per_worker
    )
    for w in workers:
        if par.expert_placement is not None and w.device_map is not None:
            w.expert_placement = par.expert_placement
    return workers


def objective_scores(scores: Mapping[str, Any], benchmark: Any) -> dict[str, float]:
    """What a search sees of one evaluation: the category scores, plus ``overall`` when the objective is
    not the plain mean (the mean is computed by :func:`soce.method.objective_of`, as the paper does)."""
    out = {c: scores[c] for c in benchmark.categories}
    if benchmark.objective != "mean":
        out["overall"] = scores["overall"]
    return out


def make_result(
    config: Config, inputs: Inputs, selection: Selection, plan: Plan, soup_path: Path | None, tracker: JobTracker
) -> JobResult:
    """The job's result: the final soup scored on every split (cached), candidates' scores, what it cost."""
    bench, soups = inputs.benchmark, inputs.soups
    ingredients = {n: float(w) for n, w in plan.weights.items() if w > 0}  # as searched: the cache keys match
    weights = {n: round(ingredients.get(n, 0.0), 9) for n in inputs.candidates}  # as shown: no 0.15000000000000002
    splits = bench.splits if config.report else [bench.select_split]
    scores = {} if soups is None else {s: _summary(soups.scores(ingredients, s)) for s in splits}
    have = list(inputs.candidate_scores)
    chosen = selection if STRATEGIES[config.strategy.name].selects else None  # a selection the soup is made of
    merge = outputs.merge_params(config)
    return JobResult(
        strategy=config.strategy.name,
        benchmark=bench.name,
        pool=config.pool.name,
        experts=chosen.ingredients if chosen else [],
        weak_set=chosen.weak if chosen else [],
        expert_of=chosen.kept if chosen else {},
        dropped=chosen.dropped if chosen else {},
        max_experts=config.selection.max_experts,
        selects=chosen is not None,
        categories=bench.categories,
        families=bench.families,
        select_split=bench.select_split,
        report_split=bench.report_split,
        correlation=outputs.matrix(selection.correlation),
        weights=weights,
        scores=scores,
        candidate_scores={n: {s: _summary(inputs.candidate_scores[s][n]) for s in have} for n in inputs.candidates},
        best_single=str(method.overall(inputs.table(bench.select_split)).idxmax()),
        soup_path=str(soup_path) if soup_path else None,
        mlflow_run_id=tracker.run_id,
        evaluated=soups.cache.evaluated if soups else 0,
        cached=soups.cache.cached if soups else 0,
        objective=bench.objective,
        search=dict(plan.notes),
        timing=soups.timing_summary() if soups else {},
        metrics=dict(inputs.metrics),
        items=inputs.items.to_json() if inputs.items else {},
        merge=merge,
        base=inputs.base if merge["method"] != "linear" else None,
    )


@contextlib.contextmanager
def finished_or_failed(tracker: JobTracker) -> Iterator[None]:
    """End the job's MLflow run FINISHED, or FAILED (with the reason as a tag) if anything raises."""
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(Exception):
            client(tracker.uri).set_tag(tracker.run_id, "soce.error", f"{type(e).__name__}: {e}"[:5000])
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def _summary(scores: Mapping[str, Any]) -> dict[str, float]:
    """Category scores and overall, without the per-item results."""
    return {k: v for k, v in scores.items() if k not in ("samples", "item_ids")}
