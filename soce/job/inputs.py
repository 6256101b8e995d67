"""A job's inputs, resolved once from the typed config: the benchmark, the pool, and the score tables.

Two sources give the same :class:`Inputs`: checkpoints (the demo zoo or local/hub paths), scored through
the in-memory merge evaluator and its cache; or a score table (``pool.source=csv``), where no model is
loaded and the benchmark is the table's own when its categories are not the configured benchmark's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from soce.benchmarks.scores import ScoreCache, read_score_csv, score_table, with_population_csv
from soce.config import BenchmarkConfig, Config, ConfigError
from soce.search.evaluator import SoupEvaluator

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """Everything up to the selection: the benchmark, the candidates, and their scores.

    ``candidate_scores[split][name]`` holds the category scores, ``overall`` (and per-item ``samples``
    when evaluated); ``population`` is the correlation population's table on the selection split."""

    benchmark: BenchmarkConfig
    candidates: dict[str, str]  # name -> checkpoint ("" when a score table has no path for it)
    candidate_scores: dict[str, dict[str, dict[str, Any]]]
    population: pd.DataFrame
    soups: SoupEvaluator | None  # None: scores only (no model can be evaluated)
    experiment: str  # the MLflow experiment (follows a score table's benchmark)
    base: str | None = None  # the candidates' base checkpoint (task-vector merge operators), if known

    def table(self, split: str) -> pd.DataFrame:
        """Candidates x categories on ``split`` (categories only, no overall)."""
        cats = self.benchmark.categories
        return score_table(self.candidate_scores[split], cats)[cats]


def gather(config: Config) -> Inputs:
    """Resolve the pool (building the demo on first use) and score candidates and population (cached)."""
    if config.pool.source == "csv":
        return _from_score_table(config)
    benchmark, candidates, population, base = _checkpoints(config)
    if benchmark.select_split == benchmark.report_split:
        log.warning("select_split == report_split (%s): experts and weights are chosen on the scores "
                    "that are reported (the paper's protocol); reported gains are optimistic", benchmark.select_split)
    soups = make_soup_evaluator(config, benchmark, {**population, **candidates}, list(candidates), base)
    sel = benchmark.select_split
    everyone = {**population, **candidates}
    log.info("scoring %d checkpoints on %s and %d candidates on %s (cached after the first run)",
             len(everyone), sel, len(candidates), "+".join(benchmark.splits))
    cand = {s: {n: soups.scores({n: 1.0}, s) for n in candidates} for s in benchmark.splits}
    pop = {n: soups.scores({n: 1.0}, sel) for n in _progress(everyone, config.progress, "scoring models")}
    cats = benchmark.categories
    population_table = with_population_csv(score_table(pop, cats)[cats], config.selection.population_csv, cats)
    return Inputs(benchmark, candidates, cand, population_table, soups, config.tracking.experiment, base)


def make_soup_evaluator(config: Config, benchmark: BenchmarkConfig, models: dict[str, str],
                        candidates: list[str], base: str | None = None) -> SoupEvaluator:
    """The in-memory merge evaluator of a job: benchmark backend, device, dtype, merge operator (with the
    candidates' ``base``) and caches from the config."""
    from soce.benchmarks import make_evaluator
    from soce.benchmarks.lmeval import pick_device, quiet_lm_eval

    quiet_lm_eval()
    device = pick_device(config.device)
    cache = ScoreCache(Path(config.paths.cache_dir))
    return SoupEvaluator(models, candidates, make_evaluator(benchmark, device), cache, device, config.dtype,
                         item_cache=_item_cache(Path(config.paths.cache_dir)), allow_nonfinite=config.allow_nonfinite,
                         merge=dict(config.merge), base=base)


def _item_cache(root: Path) -> Any:
    try:
        from soce.search.items import ItemCache
    except ImportError:  # per-item searches not installed in this tree
        return None
    return ItemCache(root / "items")


def _checkpoints(config: Config) -> tuple[BenchmarkConfig, dict[str, str], dict[str, str], str | None]:
    """(benchmark, candidates, population, base) from the demo zoo or the configured paths (the demo names its
    own base; ``pool.base`` overrides it)."""
    benchmark, pool = config.benchmark, config.pool
    base = _absolute({"base": pool.base})["base"] if pool.base else None
    if pool.source != "demo":  # local dirs made absolute (a relative one is never taken for a hub id)
        return benchmark, _absolute(pool.candidates), _absolute(pool.population), base
    from soce.demo.zoo import build_demo

    manifest = build_demo(config.demo, progress=config.progress)
    unknown = [c for c in benchmark.categories if c not in manifest["categories"]]
    if unknown:
        raise ConfigError(f"benchmark category {unknown[0]!r} is not in the demo zoo "
                          f"(it has: {', '.join(manifest['categories'])})")
    families = {c: f for c, f in manifest["families"].items() if c in benchmark.categories}
    benchmark = dataclasses.replace(benchmark, task_dir=benchmark.task_dir or manifest["task_dir"],
                                    families=benchmark.families or families)
    return benchmark, dict(manifest["candidates"]), dict(manifest["population"]), base or manifest["base"]


def _absolute(paths: dict[str, str]) -> dict[str, str]:
    return {n: str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for n, p in paths.items()}


def _from_score_table(config: Config) -> Inputs:
    """Scores only: the candidates' table (and paths) from ``pool.csv``; no model is loaded."""
    table, paths = read_score_csv(config.pool.csv)
    benchmark = config.benchmark
    experiment = config.tracking.experiment
    if set(table.columns) != set(benchmark.categories):
        name = Path(config.pool.csv).stem
        log.warning("pool.csv's categories are not benchmark %r's: the benchmark is the table's own (%r, %d "
                    "categories)", benchmark.name, name, len(table.columns))
        if experiment == f"soce-{benchmark.name}":
            experiment = f"soce-{name}"
        benchmark = dataclasses.replace(benchmark, name=name, categories=list(table.columns), families={})
    cats = benchmark.categories
    table = table[cats]
    scores = {m: {**table.loc[m].to_dict(), "overall": float(table.loc[m].mean())} for m in table.index}
    population = with_population_csv(table, config.selection.population_csv, cats)
    candidates = {m: paths.get(m, "") for m in table.index}
    return Inputs(benchmark, candidates, {benchmark.select_split: scores}, population, None, experiment)


def _progress(names: dict[str, str], enabled: bool, desc: str) -> Any:
    if not enabled:
        return list(names)
    from tqdm.auto import tqdm

    return tqdm(list(names), desc=desc, unit="model", leave=False)
