"""soce.config: every preset composes into the typed Config; every default is declared once (in the schema)."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from soce.config import CONF_DIR, Config, ConfigError, typed
from soce.job.preflight import compose_config

CONF = Path(CONF_DIR)
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# presets for pools the user fills in (the paper's checkpoints are not all public): candidates to compose with
FILL = ["++pool.candidates={a: org/a, b: org/b, c: org/c}"]


def test_presets_are_globbed():
    assert {"demo_gpu", "paper_bfcl_8b", "paper_mgsm_7b"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_to_typed_config(preset):
    try:
        config = compose_config([f"experiment={preset}", "paths.root_dir=/tmp/soce-x"])
    except Exception:  # a preset whose pool lists no candidates of its own (`???`)
        config = compose_config([f"experiment={preset}", "paths.root_dir=/tmp/soce-x", *FILL])
    assert isinstance(config, Config) and config.benchmark.categories
    assert dataclasses.is_dataclass(config.benchmark.holdout)


@pytest.mark.parametrize("preset", ["paper_mgsm_7b", "paper_bfcl_8b"])
def test_single_split_benchmarks_carve_a_held_out_split(preset):
    try:
        b = compose_config([f"experiment={preset}", "paths.root_dir=/tmp/soce-x"]).benchmark
    except Exception:
        b = compose_config([f"experiment={preset}", "paths.root_dir=/tmp/soce-x", *FILL]).benchmark
    assert b.holdout.split is not None and b.select_split != b.report_split


def test_typed_converts_plain_dicts_and_checks_types():
    config = compose_config(["paths.root_dir=/tmp/soce-x"])
    again = typed(dataclasses.asdict(config))
    assert again == config
    bad = dataclasses.asdict(config)
    bad["search"]["step"] = "abc"
    with pytest.raises(Exception, match="step"):
        typed(bad)


def _schema_defaults(node: type) -> dict:
    out = {}
    for f in dataclasses.fields(node):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = _schema_defaults(type(value)) if dataclasses.is_dataclass(value) else value
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def _restated(values: dict, defaults: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in values.items():
        if key not in defaults or key == "defaults":
            continue
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            found += _restated(value, defaults[key], f"{prefix}{key}.")
        elif value == defaults[key] and key not in ("name", "method"):
            found.append(f"{prefix}{key}")
    return found


# the groups whose options declare a behaviour by name only: their settings' defaults live in the schema
CHECKED = ("selection", "search", "strategy", "paths")
GROUP_SCHEMA = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name in CHECKED}


@pytest.mark.parametrize("path", sorted(p for g in GROUP_SCHEMA for p in (CONF / g).glob("*.yaml")), ids=str)
def test_no_group_option_restates_a_schema_default(path):
    values = yaml.safe_load(path.read_text()) or {}
    if str(values.get("defaults", "")).startswith("["):
        return
    schema = _schema_defaults(GROUP_SCHEMA[path.parent.name])
    assert _restated(values, schema) == [], f"{path.relative_to(CONF)} restates defaults of soce/config.py"


def test_root_config_restates_no_default():
    values = yaml.safe_load((CONF / "config.yaml").read_text())
    assert _restated(values, _schema_defaults(Config)) == []


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "override, key",
    [
        ("benchmark.objective=median", "benchmark.objective"),
        ("benchmark.holdout.split=test benchmark.report_split=dev", "select_split and report_split"),  # consistency
        ("benchmark.limit=0", "benchmark.limit"),
        ("pool.source=s3", "pool.source"),
        ("pool.scale=kelvin", "pool.scale"),
        ("benchmark.objective=official benchmark.limit=5", "benchmark.objective=official with benchmark.limit=5"),
        ("pool=example_local search.min_weight=0.6 selection.max_experts=2", "search.min_weight=0.6"),
        ("selection.tau=1.5", "selection.tau"),
        ("selection.tie_break=random", "selection.tie_break"),
        ("strategy=fixed", "strategy.ingredients"),
        ("search.min_weight=1.0", "search.min_weight"),
        ("search.step=0.3", "search.step"),
        ("search.race_keep=0", "search.race_keep"),
        ("parallel.workers=0", "parallel.workers"),
        ("dtype=int8", "dtype"),
        ("device=tpu", "device"),
        ("merge=ties pool=example_local", "pool.base"),
        ("merge=dare_ties merge.density=2", "merge.density"),
        ("merge=task_arithmetic +merge.density=0.5", "merge.density"),
        ("merge=ties merge.method=slerp", "merge.method"),
    ],
)
def test_each_group_refuses_a_bad_value_in_one_line_naming_the_key(override, key):
    """Value ranges and consistency live in the typed config (Config.validate, run by typed()): one line."""
    with pytest.raises(ConfigError) as e:
        compose_config(["paths.root_dir=/tmp/soce-x", *override.split()])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_range_checks_live_in_the_config_not_the_preflight():
    """The preflight checks the world; a value's range is checked by the config's own dataclasses."""
    import inspect

    from soce.job import preflight

    src = inspect.getsource(preflight)
    for phrase in ("selection.tau must", "search.min_weight must", "benchmark.objective must", "dtype must"):
        assert phrase not in src
