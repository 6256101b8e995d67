"""What a job leaves behind: its MLflow run (params, metrics, artifacts), its soup, ``result.json``.

The recipe (:mod:`soce.job.pipeline`) decides; these functions only write. Every file a job writes appears
atomically (``result.json`` through a rename, the soup through the writer's temporary sibling directory).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from soce import __version__
from soce.benchmarks.scores import score_table
from soce.config import Config
from soce.files import write_json_atomic
from soce.job.inputs import Inputs
from soce.job.strategies import STRATEGIES
from soce.report import plots
from soce.report.analyses import consistency, emergent_by_category, emergent_solves, shapley_values
from soce.tracking.naming import JobName
from soce.tracking.runs import JobTracker, split_metrics

if TYPE_CHECKING:
    from soce.job.strategies import Plan
    from soce.search.selections import Selection

log = logging.getLogger(__name__)
FLOATS = "%.6g"  # floats in CSV artifacts: 6 significant digits (0.15000000000000002 -> 0.15)


@dataclass
class JobResult:
    """What a job decided and measured; written as ``result.json`` and logged to MLflow."""

    strategy: str
    benchmark: str
    pool: str
    experts: list[str]  # the distinct experts (soup ingredients of soce_*), candidate order; [] without selection
    weak_set: list[str]  # L ([] for strategies that use no selection: uniform, best_single, greedy_soup, fixed)
    expert_of: dict[str, str]  # category in L -> expert, for the experts in the soup
    categories: list[str]
    families: dict[str, str]
    select_split: str
    report_split: str
    correlation: dict[str, dict[str, float | None]]
    weights: dict[str, float]  # every candidate's weight in the final soup (0: not an ingredient)
    scores: dict[str, dict[str, float]]  # split -> category scores + overall of the final soup ({} scores-only)
    candidate_scores: dict[str, dict[str, dict[str, float]]]  # candidate -> split -> scores
    best_single: str
    soup_path: str | None
    mlflow_run_id: str
    evaluated: int  # evaluations run by this job (the rest came from the cache)
    cached: int
    objective: str = "mean"
    label: str = ""  # the job's name: strategy + the overrides that vary across its sweep
    search: dict[str, Any] = field(default_factory=dict)  # what the search spent (points, items)
    timing: dict[str, float] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    metrics: dict[str, str] = field(default_factory=dict)  # category -> the metric it is scored by (fraction)
    items: dict[str, Any] = field(default_factory=dict)  # which items selection and report used (splits.SplitCheck)
    dropped: dict[str, str] = field(default_factory=dict)  # category in L -> expert left out by max_experts
    max_experts: int | None = None  # selection.max_experts
    selects: bool = True  # the soup is made of the selection's experts (soce_selected, soce_weighted)
    merge: dict[str, Any] = field(default_factory=lambda: {"method": "linear"})  # the operator, its parameters
    base: str | None = None  # the base checkpoint of a task-vector operator

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def start_tracker(config: Config, inputs: Inputs, parent_run_id: str | None, name: JobName) -> JobTracker:
    """The job's MLflow run (resumed when ``name.key`` names an interrupted one), named ``name.label``."""
    tags = {"soce.kind": "job", "soce.version": __version__}
    if inputs.soups is None:
        tags["soce.scores_only"] = "true"
    t = config.tracking
    return JobTracker.start(t.uri, inputs.experiment, t.artifact_location, name, parent_run_id, tags)


def log_baselines_of(tracker: JobTracker, result: JobResult) -> None:
    """A single job's baselines (one run per candidate, nested under the job's run); sweeps log theirs once."""
    from soce.tracking.runs import log_baselines

    log_baselines(tracker.uri, tracker.experiment_id, tracker.run_id, result.candidate_scores, result.best_single)


class SearchProgress:
    """One progress bar over the soups a strategy evaluates, with the best score so far."""

    def __init__(self, strategy: str, split: str, enabled: bool, total: int | None = None) -> None:
        self.desc, self.enabled, self.bar, self.best = f"{strategy}: soups on {split}", enabled, None, 0.0
        self.total = total  # points the search will evaluate, when known (a total gives tqdm its ETA)

    def update(self, scores: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=self.desc, unit="soup", total=self.total, leave=False)
        self.best = max(self.best, scores["overall"])
        self.bar.set_postfix(best=f"{100 * self.best:.2f}%", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def expected_points(config: Config, n_experts: int) -> int | None:
    """How many soups ``soce_weighted`` will evaluate (grid size or trials); None when not known up front."""
    from soce import method

    s = config.search
    if config.strategy.name != "soce_weighted" or n_experts < 2:
        return None
    if s.name == "grid":
        return len(method.weight_grid(n_experts, s.step, s.min_weight, s.include_uniform))
    return s.n_trials if s.name == "optuna" else None


def merge_params(config: Config) -> dict[str, Any]:
    """The merge operator and its resolved parameters (defaults filled in), by mergekit's names."""
    m = dict(config.merge)
    if m.get("method", "linear") == "linear" and set(m) <= {"method"}:
        return {"method": "linear"}
    from soce.soup.operators import MergeSpec

    return MergeSpec.from_mapping(m).params()


def recipe(config: Config, inputs: Inputs, plan: Plan) -> dict[str, Any]:
    """The soup's recipe (model card, safetensors metadata, recipe.yaml)."""
    return {
        "strategy": config.strategy.name,
        "benchmark": inputs.benchmark.name,
        "pool": config.pool.name,
        "weights": {n: w for n, w in plan.weights.items() if w > 0},
        "soce_version": __version__,
        "merge": merge_params(config),
    }


def write_final_soup(config: Config, inputs: Inputs, plan: Plan, out_dir: Path) -> Path | None:
    """Algorithm 1 step 4: the chosen soup as a Hugging Face checkpoint in ``out_dir/soup`` (atomically).
    Skipped with ``save_soup=false``, or when a score table gives no checkpoint for an ingredient."""
    ingredients = {n: w for n, w in plan.weights.items() if w > 0}
    paths = {n: inputs.candidates.get(n, "") for n in ingredients}
    if not config.save_soup or not all(paths.values()):
        return None
    from soce.job.preflight import HUB_ID
    from soce.soup import write_soup

    rec = {
        **recipe(config, inputs, plan),
        "split": inputs.benchmark.select_split,
        "objective": inputs.benchmark.objective,
    }
    hub_ids = {n: p for n, p in paths.items() if HUB_ID.match(p) and not Path(p).exists()}
    if hub_ids:  # the model card's base_model (local paths stay in the recipe)
        rec["hub_ids"] = hub_ids
    if inputs.soups is not None:  # where it was chosen: its selection-split score (cached by the search)
        rec["score"] = round(float(inputs.soups.scores(ingredients, inputs.benchmark.select_split)["overall"]), 6)
    merge = dict(config.merge) if len(ingredients) > 1 else None  # one ingredient: that checkpoint itself
    return write_soup(
        paths,
        ingredients,
        out_dir / "soup",
        overwrite=True,
        recipe=rec,
        allow_nonfinite=config.allow_nonfinite,
        merge=merge,
        base=inputs.base,
    )


def analyses(
    config: Config, inputs: Inputs, plan: Plan, result: JobResult, out_dir: Path
) -> tuple[dict[str, float], dict[str, Any]]:
    """The paper's analyses (``analysis`` group) from the job's own cached evaluations, their tables and
    figures in ``out_dir/artifacts``: (metrics for MLflow, summary for result.json)."""
    a = config.analysis
    if inputs.soups is None or not (a.shapley or a.consistency or a.emergent):
        return {}, {}
    art = out_dir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    summary: dict[str, Any] = {}
    if a.shapley:
        _shapley(config, inputs, art, metrics, summary)
    if a.consistency:
        _consistency(inputs, plan, art, metrics, summary)
    ingredients = {n: w for n, w in result.weights.items() if w > 0}
    if a.emergent and len(ingredients) > 1:
        _emergent(inputs, ingredients, art, metrics, summary)
    return metrics, summary


def _shapley(config: Config, inputs: Inputs, art: Path, metrics: dict, summary: dict) -> None:
    """Shapley value of each candidate, v(S) = selection-split overall of the uniform soup of S."""
    a, sel = config.analysis, inputs.benchmark.select_split

    def value(coalition: frozenset[str]) -> float:
        return float(inputs.soups.scores({n: 1.0 / len(coalition) for n in coalition}, sel)["overall"])

    res = shapley_values(list(inputs.candidates), value, 0.0, a.shapley_exact_max, a.shapley_permutations, a.seed)
    res.to_frame().to_csv(art / "shapley.csv", float_format=FLOATS)
    plots.shapley_figure(res, art / "shapley.png")
    metrics.update({f"shapley.{k}": v for k, v in res.values.items()})
    summary["shapley"] = {"values": res.values, "method": res.method, "evaluations": res.evaluations, "split": sel}


def _consistency(inputs: Inputs, plan: Plan, art: Path, metrics: dict, summary: dict) -> None:
    """Do categories correlate more strongly across the searched soups than across the population?"""
    cats, trace = inputs.benchmark.categories, plan.trace
    soups = trace[cats] if trace is not None and set(cats) <= set(trace.columns) else None
    if soups is None or len(soups) < 3:
        log.info("consistency: the job has fewer than 3 searched soups; skipped")
        return
    res = consistency(inputs.population[cats], soups)
    plots.consistency_figure(res, art / "consistency.png")
    pd.DataFrame(
        {
            "mean_r": [res.mean_r_candidates, res.mean_r_soups],
            "mean_abs_r": [res.mean_abs_r_candidates, res.mean_abs_r_soups],
        },
        index=["population", "soups"],
    ).to_csv(art / "consistency.csv", float_format=FLOATS)
    metrics.update(
        {"consistency.mean_r_population": res.mean_r_candidates, "consistency.mean_r_soups": res.mean_r_soups}
    )
    summary["consistency"] = {
        "mean_r_population": res.mean_r_candidates,
        "mean_r_soups": res.mean_r_soups,
        "excluded": list(res.excluded),
    }


def _emergent(inputs: Inputs, ingredients: dict[str, float], art: Path, metrics: dict, summary: dict) -> None:
    """Report-split items every ingredient fails that the soup solves, and the solved items it keeps."""
    cats, split = inputs.benchmark.categories, inputs.benchmark.report_split
    soup = inputs.soups.scores(ingredients, split)["samples"]
    per = {n: inputs.soups.scores({n: 1.0}, split)["samples"] for n in ingredients}
    table = emergent_by_category({c: {n: per[n][c] for n in per} for c in cats}, {c: soup[c] for c in cats})
    table.to_csv(art / "emergent.csv", float_format=FLOATS)
    pooled = emergent_solves({n: sum((per[n][c] for c in cats), []) for n in per}, sum((soup[c] for c in cats), []))
    metrics["emergent.share"] = pooled.share_emergent
    metrics.update({f"emergent.kept.{n}": k.share_kept for n, k in pooled.per_ingredient.items()})
    summary["emergent"] = {
        "split": split,
        "n_all_fail": pooled.n_all_fail,
        "n_soup_solves_all_fail": pooled.n_soup_solves_all_fail,
        "share_emergent": pooled.share_emergent,
        "share_kept": {n: k.share_kept for n, k in pooled.per_ingredient.items()},
    }


def record(
    tracker: JobTracker,
    config: Config,
    inputs: Inputs,
    selection: Selection,
    plan: Plan,
    result: JobResult,
    out_dir: Path,
    analysis_metrics: dict[str, float],
) -> None:
    """Write the artifacts and ``result.json`` and log them with the job's params and metrics."""
    art = write_artifacts(config, inputs, selection, plan, out_dir / "artifacts")
    write_json_atomic(out_dir / "result.json", result.to_json())
    tracker.log(job_params(config, inputs, selection, result), job_metrics(inputs, plan, result, analysis_metrics))
    for f in [*sorted(art.iterdir()), out_dir / "result.json"]:
        tracker.log_artifact(f)


def write_artifacts(config: Config, inputs: Inputs, selection: Selection, plan: Plan, art: Path) -> Path:
    """Score tables, correlation (CSV + heatmap), search trace, recipe and resolved config, in ``art``."""
    from soce.report.plots import correlation_heatmap

    bench, sel = inputs.benchmark, inputs.benchmark.select_split
    art.mkdir(parents=True, exist_ok=True)
    splits = list(inputs.candidate_scores)
    table = pd.concat({s: score_table(inputs.candidate_scores[s], bench.categories) for s in splits}, names=["split"])
    table.to_csv(art / "candidate_scores.csv", float_format=FLOATS)
    inputs.population.to_csv(art / "population_scores.csv", float_format=FLOATS)
    selection.correlation.to_csv(art / "correlation.csv", float_format=FLOATS)
    correlation_heatmap(
        selection.correlation,
        art / "correlation.png",
        title=f"{bench.name}: category correlation across {len(inputs.population)} models ({sel})",
    )
    if plan.trace is not None:
        plan.trace.to_csv(art / "search_trace.csv", index=False, float_format=FLOATS)
    chosen = {
        "experts": selection.kept,
        "weak_set": selection.weak,
        "tau": config.selection.tau,
        **({"dropped": selection.dropped, "max_experts": selection.cap} if selection.dropped else {}),
    }
    (art / "recipe.yaml").write_text(
        yaml.safe_dump(
            {
                **recipe(config, inputs, plan),
                **({"base": inputs.base} if inputs.base and merge_params(config)["method"] != "linear" else {}),
                **(chosen if STRATEGIES[config.strategy.name].selects else {}),
                "select_split": sel,
                "candidates": dict(inputs.candidates),
            },
            sort_keys=False,
        )
    )
    (art / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return art


def job_params(config: Config, inputs: Inputs, selection: Selection, result: JobResult) -> dict[str, Any]:
    """The job's MLflow params: what was configured and what was selected."""
    sel = config.selection
    chosen = {
        "tau": sel.tau,
        "tie_break": sel.tie_break,
        "selection_method": sel.method,
        "max_experts": sel.max_experts,
        "experts": ",".join(m for m in result.experts if result.weights.get(m)),
        "weak_set": ",".join(result.weak_set),
        **({"dropped": ",".join(dict.fromkeys(result.dropped.values()))} if result.dropped else {}),
    }
    return {
        "strategy": result.strategy,
        "pool": result.pool,
        "benchmark": result.benchmark,
        **(chosen if result.selects else {}),
        "search": config.search.name,
        "categories": ",".join(result.categories),
        "select_split": result.select_split,
        "report_split": result.report_split,
        "objective": result.objective,
        "best_single": result.best_single,
        "metric": metric_param(result.metrics),
        "items": result.items.get("mode", "scores"),
        **{f"merge.{k}" if k != "method" else "merge": v for k, v in result.merge.items()},
        **({"merge.base": result.base} if result.base else {}),
        **{f"w.{n}": weight(w) for n, w in result.weights.items()},
    }


def weight(w: float) -> float:
    """A soup weight as logged and written: 6 decimals (0.15000000000000002 -> 0.15)."""
    return round(float(w), 6)


def metric_param(metrics: dict[str, str]) -> str:
    """The metrics as one MLflow param: ``acc,none`` when every category shares it, else ``cat=metric;...``."""
    if len(set(metrics.values())) <= 1:
        return next(iter(metrics.values()), "")
    return ";".join(f"{c}={m}" for c, m in metrics.items())[:6000]


def job_metrics(inputs: Inputs, plan: Plan, result: JobResult, analysis: dict[str, float]) -> dict[str, float]:
    """The job's MLflow metrics: the soup's scores per split and what the search cost (the candidates' scores
    are baseline runs, logged once per sweep, not constants repeated in every job)."""
    metrics = {**split_metrics(result.scores), **analysis}
    if inputs.soups is None:
        metrics["population.size"] = len(inputs.population)
    if plan.trace is not None:
        metrics["search.points"] = len(plan.trace)
    metrics.update({f"search.{k}": float(v) for k, v in plan.notes.items() if isinstance(v, int | float)})
    metrics.update({f"timing.{k}": v for k, v in result.timing.items()})
    return metrics


def matrix(df: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """A correlation matrix as nested dicts, NaN as None (JSON has no NaN)."""
    return {
        c: {k: (None if pd.isna(v) else float(v)) for k, v in row.items()} for c, row in df.to_dict("index").items()
    }
