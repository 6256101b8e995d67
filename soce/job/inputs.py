"""A job's inputs, resolved once from the typed config: the benchmark, the pool, and the score tables.

Two sources give the same :class:`Inputs`: checkpoints (the demo zoo or local/hub paths), scored through
the in-memory merge evaluator and its cache; or a score table (``pool.source=csv``), where no model is
loaded and the benchmark is the table's own when its categories are not the configured benchmark's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from soce.benchmarks.scores import ScoreCache, read_score_csv, score_table, with_population_csv
from soce.benchmarks.splits import SplitCheck
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
    items: SplitCheck | None = None  # which items selection and report use (None: scores only)
    metrics: dict[str, str] = field(default_factory=dict)  # category -> the metric it is scored by
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
        log.warning(
            "select_split == report_split (%s): experts and weights are chosen on the scores "
            "that are reported (the paper's protocol); reported gains are optimistic",
            benchmark.select_split,
        )
    everyone = {**population, **candidates}
    evaluator = _backend(config, benchmark)
    benchmark, items = check_benchmark(benchmark, evaluator, {**candidates, **population})  # before evaluating
    soups = make_soup_evaluator(config, benchmark, everyone, list(candidates), evaluator, base)
    metrics = _metrics(evaluator, benchmark)
    log.info("items: %s; metrics: %s", items.statement(), ", ".join(f"{c} {m}" for c, m in metrics.items()))
    sel = benchmark.select_split
    log.info(
        "scoring %d checkpoints on %s and %d candidates on %s (cached after the first run)",
        len(everyone),
        sel,
        len(candidates),
        "+".join(benchmark.splits),
    )
    cand = {s: {n: soups.scores({n: 1.0}, s) for n in candidates} for s in benchmark.splits}
    pop = {n: soups.scores({n: 1.0}, sel) for n in _progress(everyone, config.progress, "scoring models")}
    cats = benchmark.categories
    population_table = with_population_csv(
        score_table(pop, cats)[cats], config.selection.population_csv, cats, config.pool.scale
    )
    return Inputs(
        benchmark, candidates, cand, population_table, soups, config.tracking.experiment, items, metrics, base
    )


def check_benchmark(
    benchmark: BenchmarkConfig, evaluator: Any, models: dict[str, str]
) -> tuple[BenchmarkConfig, SplitCheck]:
    """Before any evaluation: held-out items disjoint from the selection's (carved or refused:
    :mod:`soce.benchmarks.splits`), and every model able to run the items (:mod:`soce.benchmarks.fitness`)."""
    from soce.benchmarks.fitness import check_fitness
    from soce.benchmarks.splits import check_splits

    benchmark, items = check_splits(benchmark, evaluator)
    check_fitness(evaluator, models, benchmark.splits)
    return benchmark, items


def _backend(config: Config, benchmark: BenchmarkConfig) -> Any:
    from soce.benchmarks import make_evaluator
    from soce.benchmarks.lmeval import pick_device, quiet_lm_eval

    quiet_lm_eval()
    return make_evaluator(benchmark, pick_device(config.device))


def _metrics(evaluator: Any, benchmark: BenchmarkConfig) -> dict[str, str]:
    """The metric each category is scored by (the backend's, e.g. lm-eval's ``acc,none``; else ``accuracy``)."""
    fn = getattr(evaluator, "metrics", None)
    return fn(benchmark.select_split) if fn is not None else {c: "accuracy" for c in benchmark.categories}


def make_soup_evaluator(
    config: Config,
    benchmark: BenchmarkConfig,
    models: dict[str, str],
    candidates: list[str],
    evaluator: Any = None,
    base: str | None = None,
) -> SoupEvaluator:
    """The in-memory merge evaluator of a job: benchmark backend (``evaluator``, else a new one), device, dtype,
    merge operator (with the candidates' ``base``) and caches from the config."""
    from soce.benchmarks.lmeval import pick_device

    evaluator = evaluator if evaluator is not None else _backend(config, benchmark)
    cache = ScoreCache(Path(config.paths.cache_dir))
    return SoupEvaluator(
        models,
        candidates,
        evaluator,
        cache,
        pick_device(config.device),
        config.dtype,
        item_cache=_item_cache(Path(config.paths.cache_dir)),
        allow_nonfinite=config.allow_nonfinite,
        merge=dict(config.merge),
        base=base,
    )


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
        raise ConfigError(
            f"benchmark category {unknown[0]!r} is not in the demo zoo (it has: {', '.join(manifest['categories'])})"
        )
    families = {c: f for c, f in manifest["families"].items() if c in benchmark.categories}
    benchmark = dataclasses.replace(
        benchmark, task_dir=benchmark.task_dir or manifest["task_dir"], families=benchmark.families or families
    )
    return benchmark, dict(manifest["candidates"]), dict(manifest["population"]), base or manifest["base"]


def _absolute(paths: dict[str, str]) -> dict[str, str]:
    return {n: str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for n, p in paths.items()}


def table_benchmark(benchmark: BenchmarkConfig, columns: list[str], csv: str) -> BenchmarkConfig:
    """The benchmark a score table is read as: the configured one when the table has all of its categories
    (extra columns are ignored); the table's own (named after the file, all its columns) when it has none of
    them; a table with some but not all is refused naming the first missing category."""
    have = [c for c in benchmark.categories if c in columns]
    if len(have) == len(benchmark.categories):
        return benchmark
    if have:
        missing = [c for c in benchmark.categories if c not in columns]
        raise ConfigError(
            f"pool.csv {csv}: no column for benchmark category {missing[0]!r} (the table has: "
            f"{', '.join(columns)}); set benchmark.categories to the columns you mean"
        )
    name = known_benchmark(columns) or Path(csv).stem
    return dataclasses.replace(benchmark, name=name, categories=list(columns), families={})


def known_benchmark(columns: list[str]) -> str | None:
    """The name of the benchmark in ``conf/benchmark/`` whose categories are exactly ``columns`` (so that every
    score table of one benchmark files its runs in that benchmark's experiment), else None."""
    import yaml

    from soce.config import CONF_DIR

    for f in sorted(Path(CONF_DIR, "benchmark").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text()) or {}
        if isinstance(spec.get("categories"), list) and set(map(str, spec["categories"])) == set(columns):
            return str(spec.get("name", f.stem))
    return None


def _from_score_table(config: Config) -> Inputs:
    """Scores only: the candidates' table (and paths) from ``pool.csv``; no model is loaded."""
    table, paths = read_score_csv(config.pool.csv, scale=config.pool.scale)
    benchmark = table_benchmark(config.benchmark, list(table.columns), str(config.pool.csv))
    experiment = config.tracking.experiment
    if benchmark is not config.benchmark:
        log.warning(
            "pool.csv's categories are not benchmark %r's: the benchmark is the table's own (%r, %d categories)",
            config.benchmark.name,
            benchmark.name,
            len(benchmark.categories),
        )
        if experiment == f"soce-{config.benchmark.name}":
            experiment = f"soce-{benchmark.name}"
    cats = benchmark.categories
    table = table[cats]
    scores = {m: {**table.loc[m].to_dict(), "overall": float(table.loc[m].mean())} for m in table.index}
    population = with_population_csv(table, config.selection.population_csv, cats, config.pool.scale)
    candidates = {m: paths.get(m, "") for m in table.index}
    return Inputs(benchmark, candidates, {benchmark.select_split: scores}, population, None, experiment)


def _progress(names: dict[str, str], enabled: bool, desc: str) -> Any:
    if not enabled:
        return list(names)
    from tqdm.auto import tqdm

    return tqdm(list(names), desc=desc, unit="model", leave=False)
