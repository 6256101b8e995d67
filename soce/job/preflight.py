"""Everything that can be checked before work starts: every job of a sweep, composed and validated.

``preflight(overrides)`` runs in the driver before Hydra launches anything (``soce.app``), so a bad input
fails with one line and nothing is written; ``validate(config)`` also runs at the top of every job.
Checks that need the scores (e.g. whether the selected experts fit ``search.min_weight``) run right
after the selection, before the job's MLflow run is created.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from soce.config import CONF_DIR, Config, ConfigError, typed

MAX_CHECKED_JOBS = 256  # a larger sweep has each swept value checked once (others at their first value)


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def validate(cfg: Config | Mapping[str, Any]) -> None:
    """The config's own checks (:meth:`soce.config.Config.validate`: ranges, consistency), then the world's:
    registered options, files, the tracking URI, GPUs, installed backends and their tasks. Raises ConfigError
    (one line) before anything is written."""
    config = cfg if isinstance(cfg, Config) else typed(cfg)
    config.validate()
    for check in (_registered, _runtime, _pool, _tracking, _tasks, _bfcl):
        check(config)


def check_experts(config: Config, experts: list[str]) -> None:
    """After the selection, before the job's run: the search must have points for this many experts."""
    from soce import method
    from soce.job.strategies import STRATEGIES

    s = config.search
    if STRATEGIES[config.strategy.name].evaluates and config.strategy.name == "soce_weighted" and s.name == "grid":
        try:
            method.weight_grid(len(experts), s.step, s.min_weight, s.include_uniform)
        except method.SelectionError as e:
            cap = "lower selection.max_experts" if config.selection.max_experts else "set selection.max_experts"
            raise ConfigError(
                f"{e} (the selection chose {len(experts)} experts: lower search.min_weight or {cap})"
            ) from None


def _tasks(config: Config) -> None:
    """lm-eval must know every task of the benchmark, for every pool that evaluates: the demo pool's tasks are
    the ones its zoo writes (known by name before it is built; unless task_dir is set) and lm-eval's own."""
    b = config.benchmark
    if b.backend != "lm_eval" or config.pool.source == "csv":
        return
    known = _demo_tasks() if config.pool.source == "demo" and not b.task_dir else frozenset()
    if config.pool.source != "demo" or b.task_dir or b.include_default_tasks:
        known |= _task_index(b.task_dir, b.include_default_tasks)
    split_names = list(dict.fromkeys(b.source_split(s) for s in (b.select_split, b.report_split)))
    missing = [
        b.task.format(category=c, split=s)
        for c in b.categories
        for s in split_names
        if b.task.format(category=c, split=s) not in known
    ]
    if missing:
        where = f" in task_dir={b.task_dir}" if b.task_dir else ""
        hint = "" if b.include_default_tasks else " (benchmark.include_default_tasks=true indexes lm-eval's own)"
        if not b.task_dir and missing[0] in _demo_tasks():  # the demo's tasks, with another pool
            hint = (
                " (a demo zoo task: the zoo writes them for pool=demo; with another pool set"
                " benchmark.task_dir=<a built zoo>/tasks, e.g. outputs/demo/cpu-seed0/tasks)"
            )
        raise ConfigError(f"benchmark {b.name!r}: lm-eval has no task {missing[0]!r}{where}{hint}")


def _demo_tasks() -> frozenset[str]:
    from soce.demo.tasks import BY_NAME, SPLITS, TASK_TEMPLATE

    return frozenset(TASK_TEMPLATE.format(category=c, split=s) for c in BY_NAME for s in SPLITS)


def _bfcl(config: Config) -> None:
    """benchmark.backend=bfcl: categories, objective, options, and the install (only jobs that evaluate need it)."""
    if config.benchmark.backend != "bfcl":
        return
    from soce.benchmarks import bfcl, bfcl_sdk

    bfcl.check_config(config.benchmark)
    if config.pool.source != "csv":
        bfcl_sdk.load()  # ConfigError: "benchmark.backend=bfcl needs bfcl-eval: make bfcl"


def _task_index(task_dir: str | None, include_defaults: bool) -> frozenset[str]:
    from soce.benchmarks.lmeval import task_manager

    if task_dir and not Path(task_dir).is_dir():
        raise ConfigError(f"benchmark.task_dir: no folder {task_dir}")
    return frozenset(task_manager(task_dir, include_defaults).all_tasks)


def _registered(config: Config) -> None:
    """Options that name a registered implementation (what this installation has)."""
    from soce.benchmarks import KNOWN_BACKENDS
    from soce.job.strategies import STRATEGIES
    from soce.search.searches import SEARCHES
    from soce.search.selections import SELECTIONS

    b, sel, s, search = config.benchmark, config.selection, config.strategy, config.search
    if b.backend not in KNOWN_BACKENDS:
        raise ConfigError(f"unknown benchmark.backend {b.backend!r}; available: {', '.join(KNOWN_BACKENDS)}")
    if sel.method not in SELECTIONS:
        raise ConfigError(f"selection.method must be one of {', '.join(SELECTIONS)}, got {sel.method!r}")
    if s.name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {s.name!r}; available: {', '.join(sorted(STRATEGIES))}")
    if search.name not in SEARCHES:
        raise ConfigError(f"unknown search {search.name!r}; available: {', '.join(SEARCHES)}")


def _runtime(config: Config) -> None:
    """The GPUs the config asks for exist."""
    par = config.parallel
    if par.workers * par.gpus_per_worker > 1 and config.device != "cpu":
        import torch

        n = torch.cuda.device_count()
        if n and par.workers * par.gpus_per_worker > n:
            raise ConfigError(
                f"parallel.workers x gpus_per_worker = {par.workers * par.gpus_per_worker} GPUs, but {n} are visible"
            )
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device={config.device}: no CUDA device here (use device=auto or cpu)")


def _pool(config: Config) -> None:
    pool, sel = config.pool, config.selection
    for key, path in (("pool.csv", pool.csv), ("selection.population_csv", sel.population_csv)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{key}: no file {path}")
    if pool.source == "demo":
        _demo(config)
    elif pool.source == "csv":
        _score_table(config)
    else:
        _paths(config)
    if pool.source != "csv" and sel.population_csv is not None:
        _population_table(config)


def _population_table(config: Config) -> None:
    """selection.population_csv beside evaluated candidates: readable, in one unit, with every category."""
    from soce.benchmarks.scores import read_score_csv

    read_score_csv(config.selection.population_csv, config.benchmark.categories, config.pool.scale)


def _demo(config: Config) -> None:
    from soce.demo.tasks import BY_NAME
    from soce.demo.zoo import PRESETS

    if config.demo.preset not in PRESETS:
        raise ConfigError(f"demo.preset must be one of {', '.join(PRESETS)}, got {config.demo.preset!r}")
    candidates = sum(r.candidate for r in PRESETS[config.demo.preset].recipes)
    problem = next((msg for bad, msg in config.weight_checks(candidates) if bad), None)
    if problem:
        raise ConfigError(problem)
    unknown = [c for c in config.benchmark.categories if c not in BY_NAME]
    if unknown:
        raise ConfigError(f"benchmark category {unknown[0]!r} is not in the demo zoo (it has: {', '.join(BY_NAME)})")


def _score_table(config: Config) -> None:
    from soce.benchmarks.scores import read_score_csv
    from soce.job.strategies import STRATEGIES

    pool, sel, s = config.pool, config.selection, config.strategy
    if STRATEGIES[s.name].evaluates:
        no_eval = [n for n, st in STRATEGIES.items() if not st.evaluates]
        raise ConfigError(
            f"strategy {s.name!r} evaluates soups and needs checkpoints; with pool.source=csv "
            f"use one of {', '.join(no_eval)}"
        )
    from soce.job.inputs import table_benchmark

    table = read_score_csv(pool.csv, scale=pool.scale)[0]
    cats = table_benchmark(config.benchmark, list(table.columns), str(pool.csv)).categories
    extra = read_score_csv(sel.population_csv, cats, pool.scale)[0] if sel.population_csv else None
    size = len(table) + (0 if extra is None else int((~extra.index.isin(table.index)).sum()))
    _population_size(size)


def _paths(config: Config) -> None:
    pool = config.pool
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    for name, path in {**pool.candidates, **pool.population}.items():
        p = Path(str(path)).expanduser()
        if p.exists():
            continue
        if str(path).startswith(("/", ".", "~")) or not HUB_ID.match(str(path)):
            raise ConfigError(f"pool {pool.name!r}: checkpoint {name!r} not found at {path}")
        if offline and not _in_hub_cache(str(path)):
            raise ConfigError(
                f"pool {pool.name!r}: checkpoint {name!r}: no local dir {path} (relative to "
                f"{os.getcwd()}), not in the local hub cache, and HF_HUB_OFFLINE=1 forbids a download"
            )
    if config.selection.population_csv is None:
        _population_size(len({**pool.population, **pool.candidates}))
    _candidate_configs(pool.candidates)
    _loadable(pool.name, {**pool.candidates, **pool.population})
    _base(config)


def _loadable(pool_name: str, paths: Mapping[str, str]) -> None:
    """Every local checkpoint of the pool is a model directory that can be evaluated: a config.json and
    safetensors weights whose headers read (pickle-only weights are refused with the command that converts
    them, before transformers would load and run them). Headers only: no tensor data is read."""
    from soce.soup import SoupError, open_checkpoint

    for name, path in paths.items():
        p = Path(str(path)).expanduser()
        if not p.is_dir():
            continue  # a hub id (checked above); a bare file is not a model transformers loads
        try:
            open_checkpoint(name, p)
        except SoupError as e:
            raise ConfigError(f"pool {pool_name!r}: {one_line(e)}") from None
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"pool {pool_name!r}: checkpoint {name!r} at {p} has no config.json (a transformers model"
                " directory is what gets evaluated)"
            )


def _candidate_configs(candidates: Mapping[str, str]) -> None:
    """Local candidates whose config.json differ in an architecture key cannot be souped (soce.soup.checks)."""
    from soce.soup import SoupError
    from soce.soup.checks import check_configs

    local = {n: Path(str(p)).expanduser() for n, p in candidates.items() if Path(str(p)).expanduser().is_dir()}
    try:
        check_configs(local, warn=False)
    except SoupError as e:
        raise ConfigError(f"pool: {e}") from None


def _base(config: Config) -> None:
    """A task-vector operator's ``pool.base`` exists and matches the local candidates (names, shapes, dtypes:
    headers only)."""
    pool = config.pool
    if config.merge.get("method", "linear") == "linear" or not pool.base:
        return
    p = Path(str(pool.base)).expanduser()
    if not p.exists():
        if str(pool.base).startswith(("/", ".", "~")) or not HUB_ID.match(str(pool.base)):
            raise ConfigError(f"pool.base: no checkpoint at {pool.base}")
        return
    local = {n: c for n, c in pool.candidates.items() if Path(str(c)).expanduser().exists()}
    if local:
        from soce.soup import SoupError, check_models

        try:
            check_models({**local, "pool.base": str(p)})
        except SoupError as e:
            raise ConfigError(f"pool.base: {one_line(e)}") from None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model is in the local Hugging Face cache (what offline mode can load)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _population_size(n: int) -> None:
    if n < 3:
        raise ConfigError(
            f"the category correlation needs at least 3 models in the population, got {n} "
            "(add pool.population entries or selection.population_csv)"
        )


def _tracking(config: Config) -> None:
    from soce.tracking.store import check_tracking_uri

    problem = check_tracking_uri(config.tracking.uri)  # unknown schemes; a server that does not answer: seconds
    if problem:
        raise ConfigError(problem)


def job_overrides(overrides: list[str], max_jobs: float = MAX_CHECKED_JOBS) -> list[list[str]]:
    """The override lists of a multirun's jobs: every job of the sweep (the product of the swept values) up
    to ``max_jobs``, else one list per value of every swept key, the others at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    first, sweeps = [], []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # interval sweeps (for optimising sweepers) have no finite list
                continue
            sweeps.append((o.get_key_element(), values))
            first.append(f"{o.get_key_element()}={values[0]}")
        else:
            first.append(o.input_line)
    if math.prod(len(v) for _, v in sweeps) <= max_jobs:
        jobs = []
        for combo in itertools.product(*(values for _, values in sweeps)):
            chosen = dict(zip([k for k, _ in sweeps], combo, strict=True))
            jobs.append([f"{k}={chosen[k]}" if (k := x.split("=", 1)[0]) in chosen else x for x in first])
        return jobs
    lists = [first]
    for key, values in sweeps:
        for v in values[1:]:
            lists.append([f"{key}={v}" if x.split("=", 1)[0] == key else x for x in first])
    return lists


def compose_config(overrides: list[str]) -> Config:
    """The typed job config for one list of overrides (no sweeps), as Hydra would compose it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from soce.config import register_configs, unknown_keys

    register_configs()
    with initialize_config_dir(CONF_DIR, version_base="1.3", job_name="soce"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    extra = unknown_keys(cfg)
    if extra:
        raise ConfigError(f"unknown config key '{extra[0]}' (check the spelling; `--cfg job` shows the config)")
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return typed(cfg)


def preflight(overrides: list[str]) -> str | None:
    """Compose and validate every job's config; the first problem as one line, or None."""
    try:
        for ov in job_overrides(overrides):
            validate(compose_config(ov))
    except ConfigError as e:
        return str(e)
    except Exception as e:  # Hydra/OmegaConf composition errors: condense to one line
        return one_line(e)
    return None


def one_line(e: BaseException) -> str:
    """A Hydra/OmegaConf error as one line (with the options Hydra lists, and the cause)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    head = lines[0] if lines else type(e).__name__
    if "Available options" in str(e):
        opts = [ln for ln in lines if not ln.startswith(("Available", "Config search", "provider="))][1:]
        head += f" (available: {', '.join(opts)})"
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip() and str(cause).splitlines()[0] not in head:
        head = head.rstrip(".") + ": " + str(cause).strip().splitlines()[0]
    return head.replace("In 'config': ", "")
