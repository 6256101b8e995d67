"""Structured configs: the schema every composed config is checked against.

Each dataclass types one config group (``conf/<group>/``); the root ``Config`` is registered in Hydra's
ConfigStore and listed first in ``conf/config.yaml``'s defaults, so every group option merged into it
is checked: an unknown key or a wrong type fails at compose time, before anything runs or is written.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


def _conf_dir() -> str:
    """The config tree: ``soce/conf`` in an installed wheel (pyproject maps ``conf/`` there), else the
    source tree's ``conf/`` (editable installs, CI)."""
    here = Path(__file__).resolve().parent
    return str(here / "conf" if (here / "conf" / "config.yaml").is_file() else here.parent / "conf")


CONF_DIR = _conf_dir()


class ConfigError(ValueError):
    """A config (or an input it names) that composes but cannot run; ``str(e)`` is one line naming the problem."""


# The values a key may take, declared once (the registries of strategies, searches, selections and backends
# are checked by soce.job.preflight, which knows what is installed).
DTYPES = ("bfloat16", "float16", "float32", "float64")  # dtype: what soups are evaluated and written in
OBJECTIVES = ("mean", "official")  # benchmark.objective
POOL_SOURCES = ("paths", "demo", "csv")  # pool.source
SCALES = (None, "percent", "fraction")  # pool.scale: unit of the score tables (None: auto)
PROPOSALS = ("grid", "tpe", "gp")  # search.proposal (race)
SAMPLERS = ("tpe", "gp")  # search.sampler (optuna)
EXPERT_PLACEMENTS = (None, "with_shard", "host", "auto")  # parallel.expert_placement
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # device
# merge.method -> the parameters it takes (soce.soup.operators.OPERATORS; a test keeps the two equal)
_TV = ("density", "lambda", "normalize", "rescale")
MERGE_METHODS: dict[str, tuple[str, ...]] = {
    "linear": ("normalize",),
    "task_arithmetic": ("lambda", "normalize"),
    "ties": _TV,
    "dare_linear": (*_TV, "seed"),
    "dare_ties": (*_TV, "seed"),
}


def _refuse(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first check that failed (``(bad, one line naming the key)``)."""
    for bad, message in checks:
        if bad:
            raise ConfigError(message)


def _one_of(key: str, value: Any, options: tuple) -> tuple[bool, str]:
    return value not in options, f"{key} must be one of {', '.join(map(str, options))}, got {value!r}"


@dataclass
class PathsConfig:
    """Where things go. All absolute once resolved."""

    root_dir: str = MISSING  # the project (or working) directory
    output_dir: str = MISSING  # everything a run writes: runs, mlflow.db, demo zoo, caches
    cache_dir: str = MISSING  # evaluation cache (scores keyed by model, weights, benchmark, settings)


@dataclass
class HoldoutConfig:
    """Disjoint selection and report item sets carved out of ONE split (for benchmarks that ship one).

    With ``split`` set, ``benchmark.select_split`` and ``benchmark.report_split`` name the two halves: the
    items of ``split`` are divided per category, deterministically by item id and ``seed``, a fraction
    ``select_fraction`` going to the selection half (``soce.benchmarks.holdout``)."""

    split: str | None = None  # the split to carve; null: off (select/report splits are real splits)
    select_fraction: float = 0.5  # share of each category's items used for selection
    seed: int = 0


@dataclass
class BenchmarkConfig:
    """A benchmark: categories scored by one backend (``soce.benchmarks``), on a selection and a report split.

    For the ``lm_eval`` backend, ``task`` is a template formatted with ``category`` and ``split``, e.g.
    ``mgsm_direct_{category}`` (no split: one task per category) or ``soce_demo_{category}_{split}``.
    """

    name: str = MISSING
    categories: list[str] = MISSING
    backend: str = "lm_eval"  # registered evaluator backend: lm_eval | bfcl
    task: str = "{category}"  # lm_eval: task-name template
    task_dir: str | None = None  # extra lm-eval task folder (include_path)
    include_default_tasks: bool = False  # also index lm-eval's ~15k built-in tasks (slow, ~12 s)
    select_split: str = "dev"  # correlation, selection and weight search read only this split
    report_split: str = "test"  # the split reported in tables (held out from selection)
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)
    # lm-eval metric per category, a fraction in [0, 1]: null (each task's own primary metric: the first of its
    # metric_list, else exact_match for generate_until, acc for multiple_choice and loglikelihood; its filter, else
    # none), one "name" / "name,filter" for every category, or a mapping {category: "name[,filter]"} (categories
    # left out of it take their task's own)
    metric: Any = None
    strict_splits: bool = False  # select and report splits that share items: refuse (true) instead of carving halves
    max_new_tokens: int | None = None  # generation budget per item (lm-eval max_gen_toks, BFCL); null: task/backend's
    objective: str = "mean"  # what searches maximise and "overall" reports: mean (of categories) | official
    num_fewshot: int | None = None
    limit: int | None = None  # items per task (debugging only)
    batch_size: int = 64
    families: dict[str, str] = field(default_factory=dict)  # category -> family (for the report); demo: filled in
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific settings (e.g. bfcl: handler)

    @property
    def splits(self) -> list[str]:
        """The distinct splits a job scores: selection first."""
        return list(dict.fromkeys([self.select_split, self.report_split]))

    def task_name(self, category: str, split: str) -> str:
        return self.task.format(category=category, split=self.source_split(split))

    def metric_of(self, category: str) -> str | None:
        """The metric asked for ``category`` ("name" or "name,filter"); None: the task's own primary metric."""
        return self.metric.get(category) if isinstance(self.metric, dict) else self.metric

    def source_split(self, split: str) -> str:
        """The data split that ``split`` reads (the carved split when a holdout is set)."""
        return self.holdout.split if self.holdout.split else split

    def validate(self) -> None:
        h = self.holdout
        _refuse(
            [
                (not self.categories, f"benchmark {self.name!r} lists no categories"),
                (len(set(self.categories)) != len(self.categories), f"benchmark {self.name!r} lists a category twice"),
                (
                    self.backend == "lm_eval" and "{category}" not in self.task,
                    f"benchmark.task {self.task!r} must contain {{category}}",
                ),
                _one_of("benchmark.objective", self.objective, OBJECTIVES),
                (self.limit is not None and self.limit < 1, f"benchmark.limit must be >= 1 or null, got {self.limit}"),
                (
                    self.objective == "official" and self.limit is not None,
                    f"benchmark.objective=official with benchmark.limit={self.limit}: the official overall weighs "
                    f"categories by their items, and a limit changes those counts (use objective=mean with a limit)",
                ),
                (self.batch_size < 1, f"benchmark.batch_size must be >= 1, got {self.batch_size}"),
                (
                    self.max_new_tokens is not None and self.max_new_tokens < 1,
                    f"benchmark.max_new_tokens must be >= 1 or null, got {self.max_new_tokens}",
                ),
                *_metric_checks(self),
                (
                    h.split is not None and not 0 < h.select_fraction < 1,
                    f"benchmark.holdout.select_fraction must be in (0, 1), got {h.select_fraction}",
                ),
                (
                    h.split is not None and self.select_split == self.report_split,
                    "benchmark.holdout carves two halves: select_split and report_split must differ",
                ),
            ]
        )


def _metric_checks(b: BenchmarkConfig) -> list[tuple[bool, str]]:
    """benchmark.metric: null, one metric name, or a mapping of known categories to names."""
    m = b.metric
    if m is None or isinstance(m, str):
        return [(m is not None and not m.split(",")[0].strip(), "benchmark.metric must be a metric name, got ''")]
    if not isinstance(m, dict):
        return [(True, f"benchmark.metric must be null, a name or {{category: name}}, got {m!r}")]
    unknown = [c for c in m if c not in b.categories]
    bad = [c for c, v in m.items() if not isinstance(v, str) or not v.split(",")[0].strip()]
    return [
        (
            bool(unknown),
            f"benchmark.metric names {unknown[0] if unknown else ''!r}, not a category of "
            f"benchmark {b.name!r} ({', '.join(b.categories)})",
        ),
        (bool(bad), f"benchmark.metric.{bad[0] if bad else ''}: a metric name is a string, e.g. exact_match"),
    ]


@dataclass
class PoolConfig:
    """Candidate checkpoints (the soup ingredients) and the correlation population.

    ``source: demo`` takes both from the built-in demo zoo; ``source: paths`` from the mappings below
    (name -> local checkpoint dir or hub id); ``source: csv`` reads candidate scores from a table
    (rows: models, columns: categories, optional ``path``) and selects without evaluating any model.
    The population always includes the candidates.
    """

    name: str = MISSING
    source: str = "paths"  # paths | demo | csv
    candidates: dict[str, str] = field(default_factory=dict)
    population: dict[str, str] = field(default_factory=dict)
    csv: str | None = None  # source=csv: the candidates' score table
    # unit of the score tables read (pool.csv and selection.population_csv): percent | fraction; null: auto
    # (fractions when every cell is <= 1, else percent; a column all <= 1 in a percent table is refused)
    scale: str | None = None
    base: str | None = None  # the checkpoint the candidates were fine-tuned from (task-vector merges); demo: its own

    def validate(self) -> None:
        _refuse(
            [
                _one_of("pool.source", self.source, POOL_SOURCES),
                _one_of("pool.scale", self.scale, SCALES),
                (self.source == "csv" and self.csv is None, "pool.source=csv needs pool.csv=<score table>"),
                (self.source == "paths" and not self.candidates, f"pool {self.name!r} lists no candidates"),
            ]
        )


def merge_problems(merge: dict[str, Any], pool: PoolConfig) -> list[tuple[bool, str]]:
    """Checks of the ``merge`` group (operator and mergekit-named parameters) and that a task-vector operator
    has a base (``pool.base``; the demo pool names its own)."""
    method = merge.get("method", "linear")
    if method not in MERGE_METHODS:
        return [(True, f"merge.method must be one of {', '.join(MERGE_METHODS)}, got {method!r}")]
    extra = [k for k, v in merge.items() if k != "method" and v is not None and k not in MERGE_METHODS[method]]
    d, lam, seed = merge.get("density"), merge.get("lambda"), merge.get("seed")
    return [
        (
            bool(extra),
            f"merge.{extra[0] if extra else ''}: merge={method} takes only {', '.join(MERGE_METHODS[method])}",
        ),
        (
            d is not None and not (isinstance(d, int | float) and 0 <= d <= 1),
            f"merge.density must be in [0, 1], got {d!r}",
        ),
        (
            lam is not None and not (isinstance(lam, int | float) and lam == lam and abs(lam) != float("inf")),
            f"merge.lambda must be a finite number, got {lam!r}",
        ),
        (
            seed is not None and not (isinstance(seed, int) and seed >= 0),
            f"merge.seed must be an integer >= 0, got {seed!r}",
        ),
        (
            method != "linear" and not pool.base and pool.source != "demo",
            f"merge={method} works on task vectors: set pool.base=<the checkpoint the candidates were fine-tuned "
            f"from> (pool {pool.name!r} names none)",
        ),
    ]


@dataclass
class SelectionConfig:
    """Algorithm 1, steps 1-2: the weak set L and the experts."""

    method: str = "threshold"  # threshold (the paper's weak set L) | cluster (one expert per category cluster)
    tau: float = 0.5  # |rho| below this with at least one other category puts a category in L
    tie_break: str = "overall"  # overall: among tied experts, higher select-split overall wins; then pool order
    max_experts: int | None = None  # keep the best-overall experts if more are selected
    population_csv: str | None = None  # score table of a larger population for the correlation (rows: models)

    def validate(self) -> None:
        from soce.method import TIE_BREAKS  # the algorithm declares its tie-breaks

        _refuse(
            [
                _one_of("selection.tie_break", self.tie_break, TIE_BREAKS),
                (not 0 <= self.tau <= 1, f"selection.tau must be in [0, 1], got {self.tau}"),
                (
                    self.max_experts is not None and self.max_experts < 1,
                    f"selection.max_experts must be >= 1, got {self.max_experts}",
                ),
            ]
        )


@dataclass
class StrategyConfig:
    """A merge strategy, by its registered name (see soce.job.strategies.STRATEGIES)."""

    name: str = MISSING
    ingredients: list[str] = field(default_factory=list)  # strategy=fixed: the candidates to soup ...
    weights: list[float] = field(default_factory=list)  # ... and their weights (normalised to sum 1)

    def validate(self) -> None:
        names, ws = list(self.ingredients), list(self.weights)
        _refuse(
            [
                (
                    self.name == "fixed" and (not names or len(names) != len(ws) or min(ws) < 0 or sum(ws) <= 0),
                    f"strategy=fixed needs strategy.ingredients=[...] and as many non-negative "
                    f"strategy.weights=[...] (not all 0); got {names} / {ws}",
                )
            ]
        )


@dataclass
class SearchConfig:
    """Weight search for strategies that search (soce_weighted)."""

    name: str = "grid"  # grid (the paper) | optuna (TPE/GP with a budget) | race (soce/search/race.py)
    step: float = 0.1  # grid: spacing of each weight
    min_weight: float = 0.1  # smallest weight of an ingredient (the paper: 0.1)
    include_uniform: bool = True  # grid: also try the equal-weight point (the paper does)
    n_trials: int = 15  # optuna: evaluation budget (trials in the study, resumed ones included)
    seed: int = 0  # optuna: sampler seed
    storage: str | None = None  # optuna: e.g. sqlite:////abs/optuna.db to resume a study across runs
    sampler: str = "tpe"  # optuna: tpe | gp
    budget: float | None = None  # most full selection-split evaluations a search may spend (null: no cap)
    proposal: str = "grid"  # race: the points raced: grid | tpe | gp (optuna on the race's first items)
    # race: the racing rule's knobs; null keeps search.race.RaceSettings' default (declared there, with its meaning)
    race_delta: float | None = None  # chance the bound drops the selection split's best point (Bonferroni)
    race_start: float | None = None  # first subset, fraction of each category's items
    race_growth: float | None = None  # subset growth per round
    race_keep: float | None = None  # share of survivors kept per round (halving); 1: the bound alone
    race_finalists: int | None = None  # points scored on the whole selection split

    def validate(self) -> None:
        from soce.method import SelectionError, weight_grid

        _refuse(
            [
                (self.n_trials < 1, f"search.n_trials must be >= 1, got {self.n_trials}"),
                (not 0 <= self.min_weight < 1, f"search.min_weight must be in [0, 1), got {self.min_weight}"),
                (
                    self.budget is not None and not self.budget > 0,
                    f"search.budget must be > 0 (full selection-split evaluations), got {self.budget}",
                ),
                _one_of("search.sampler", self.sampler, SAMPLERS),
                _one_of("search.proposal", self.proposal, PROPOSALS),
                *_race_checks(self),
            ]
        )
        try:
            weight_grid(1, self.step, self.min_weight)
        except SelectionError as e:
            raise ConfigError(str(e)) from None

    def most_experts(self) -> int:
        """The most ingredients that can each get ``min_weight`` with weights summing to 1 (grid: rounded up
        to its ``step``)."""
        import math

        if self.min_weight <= 0:
            return 10**9
        if self.name == "grid":
            units = round(1 / self.step)
            return units // max(1, math.ceil(round(self.min_weight / self.step, 9)))
        return math.floor(1 / self.min_weight + 1e-9)


def _race_checks(c: SearchConfig) -> list[tuple[bool, str]]:
    """Ranges of the racing rule's knobs (null: the rule's default, always valid)."""
    given = [
        ("race_delta", c.race_delta, lambda v: 0 < v < 1, "in (0, 1)"),
        ("race_start", c.race_start, lambda v: 0 < v <= 1, "in (0, 1]"),
        ("race_growth", c.race_growth, lambda v: v > 1, "> 1"),
        ("race_keep", c.race_keep, lambda v: 0 < v <= 1, "in (0, 1]"),
        ("race_finalists", c.race_finalists, lambda v: v >= 1, ">= 1"),
    ]
    return [(v is not None and not ok(v), f"search.{k} must be {rng}, got {v}") for k, v, ok, rng in given]


@dataclass
class TrackingConfig:
    """MLflow store. ``uri`` is absolute (sqlite:////abs/path.db or http://host:port)."""

    uri: str = MISSING
    artifact_location: str | None = None  # for new experiments; None lets the server decide
    experiment: str = "soce-${benchmark.name}"


@dataclass
class DemoConfig:
    """Where and how to build the demo (a Hydra structured-config node ``demo``).

    preset: ``"cpu"`` (default demo, ~1M params, a few minutes on 2 cores), ``"small"`` (the cpu zoo with
    shorter training, 40/60 items per split), ``"fast"`` (0.14M params, shorter items, ~20 s: debug=fast,
    make smoke, end-to-end tests), ``"tiny"`` (mechanics only, seconds) or ``"gpu"`` (tens of millions of
    params, uses CUDA when available).
    The zoo is built under ``f"{root}/{preset}-seed{seed}"``.
    """

    seed: int = 0
    preset: str = "cpu"
    root: str = "outputs/demo"
    device: str = "auto"  # "auto" (cuda if available for the gpu preset, else cpu), "cpu" or "cuda"


@dataclass
class AnalysisConfig:
    """Which analyses a job runs (all off by default: each costs evaluations)."""

    shapley: bool = False
    consistency: bool = False
    emergent: bool = False
    shapley_exact_max: int = 8  # exact Shapley up to this many candidates (2^n - 1 soups), sampled beyond
    shapley_permutations: int = 64  # sampled Shapley: permutations (antithetic pairs)
    seed: int = 0


@dataclass
class ParallelConfig:
    """Search points evaluated at once, one worker per GPU (or per group of GPUs for a sharded model)."""

    workers: int = 1  # in-memory evaluators working on the search's points at once (1: serial)
    gpus_per_worker: int = 1  # >1: each worker's live model is sharded over its GPUs (transformers device_map)
    expert_placement: str | None = None  # sharded workers: with_shard | host | auto (None: the Remixer's default)

    def validate(self) -> None:
        _refuse(
            [
                (
                    self.workers < 1 or self.gpus_per_worker < 1,
                    f"parallel.workers and parallel.gpus_per_worker "
                    f"must be >= 1, got {self.workers} / {self.gpus_per_worker}",
                ),
                _one_of("parallel.expert_placement", self.expert_placement, EXPERT_PLACEMENTS),
            ]
        )


@dataclass
class Config:
    """The root config; ``conf/config.yaml`` composes the groups below into it."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # the merge operator (conf/merge/: linear | task_arithmetic | ties | dare_linear | dare_ties) and its
    # parameters by mergekit's names (density, lambda, normalize, rescale, seed); see soce.soup.operators
    merge: dict[str, Any] = field(default_factory=lambda: {"method": "linear"})
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    dtype: str | None = None  # dtype to evaluate and write soups in; None keeps the checkpoints'
    save_soup: bool = True  # write the final soup as a Hugging Face checkpoint into the job dir
    allow_nonfinite: bool = False  # let NaN/inf weights into soups (default: refused, naming tensor and file)
    report: bool = True  # also score the final soup on the report split (sweep-mode points skip it)
    progress: bool = True  # progress bars (zoo build, scoring, searches)

    def validate(self) -> None:
        """Every value's range and its consistency with other values; raises ConfigError (one line naming the
        key). What lies outside the config (files, servers, GPUs, installed backends) is soce.job.preflight's."""
        for part in (self.benchmark, self.pool, self.selection, self.strategy, self.search, self.parallel):
            part.validate()
        _refuse(merge_problems(dict(self.merge), self.pool))
        _refuse(
            [
                (
                    self.dtype is not None and self.dtype not in DTYPES,
                    f"dtype must be one of {', '.join(DTYPES)} or null, got {self.dtype!r}",
                ),
                (not DEVICE.fullmatch(self.device), f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
                *self.weight_checks(None),
                (
                    self.search.name == "race" and self.benchmark.objective != "mean",
                    f"search=race races the mean of category means; benchmark.objective={self.benchmark.objective} "
                    f"is not linear in the categories' items yet",
                ),
            ]
        )

    def weight_checks(self, n_candidates: int | None) -> list[tuple[bool, str]]:
        """soce_weighted: the largest selection (``selection.max_experts``, the categories, ``n_candidates`` or
        the paths pool's candidates) must fit ``search.min_weight``; else one line naming the keys. The demo
        pool's candidates are counted by the preflight (its zoo's recipes), so here it is skipped."""
        sel, s = self.selection, self.search
        if self.strategy.name != "soce_weighted" or (n_candidates is None and self.pool.source == "demo"):
            return []
        n = n_candidates if n_candidates is not None else (len(self.pool.candidates) or None)
        bounds = [k for k in (sel.max_experts, len(self.benchmark.categories), n) if k]
        k, fit = min(bounds), s.most_experts()
        hint = (
            "lower search.min_weight or selection.max_experts"
            if sel.max_experts
            else f"lower search.min_weight or set selection.max_experts<={fit}"
        )
        return [
            (
                k > fit,
                f"search.min_weight={s.min_weight} ({s.name}) fits at most {fit} experts, but the "
                f"selection can return {k} (k x min_weight > 1): {hint}",
            )
        ]


_LAUNCH_ID = secrets.token_hex(3)  # one per driver process; cached in the config, so jobs see the same value


def register_configs() -> None:
    """Register the root schema in Hydra's ConfigStore (``conf/config.yaml`` lists it first) and the resolver
    ``${soce.launch:}``, a random id per launch that makes output dirs unique (conf/hydra/default.yaml)."""
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="_config_schema", node=Config)
    OmegaConf.register_new_resolver("soce.launch", lambda: _LAUNCH_ID, use_cache=True, replace=True)


def unknown_keys(cfg: Any, schema: type = Config, prefix: str = "") -> list[str]:
    """Keys of ``cfg`` that the schema does not declare (``+key=...`` overrides bypass Hydra's check)."""
    import dataclasses

    known = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key in cfg:
        if key == "hydra" and not prefix:
            continue
        if key not in known:
            out.append(prefix + str(key))
            continue
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            out += unknown_keys(cfg[key], sub, f"{prefix}{key}.")
    return out


def typed(cfg: Any) -> Config:
    """A composed config (DictConfig or plain dicts) as the typed :class:`Config` (nested dataclasses),
    checked against the schema and validated (:meth:`Config.validate`): the one conversion at the top of a job."""
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(Config), {k: v for k, v in dict(cfg).items() if k != "hydra"})
    config: Config = OmegaConf.to_object(node)  # type: ignore[assignment]
    config.validate()
    return config


def to_plain(cfg: Any) -> dict:
    """A resolved config as plain Python containers (nothing downstream touches OmegaConf)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
