"""soce.job.preflight: every check that can run before work starts, on composed configs."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from soce.config import ConfigError, register_configs, to_plain, unknown_keys
from soce.job.preflight import validate

from .conftest import ROOT

register_configs()


def composed(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["paths.root_dir=/tmp/soce-x", *overrides])


def test_default_config_composes_and_validates():
    cfg = to_plain(composed())
    assert cfg["strategy"]["name"] == "soce_weighted" and cfg["pool"]["source"] == "demo"
    assert cfg["tracking"]["uri"] == "sqlite:////tmp/soce-x/outputs/mlflow.db"
    validate(cfg)


@pytest.mark.parametrize("strategy", ["uniform", "soce_selected", "soce_weighted", "best_single"])
def test_every_strategy_option_composes(strategy):
    validate(to_plain(composed(f"strategy={strategy}")))


def test_unknown_option_key_and_type_fail_at_compose():
    with pytest.raises(ConfigCompositionException, match="nonexistent"):
        composed("strategy=nonexistent")
    with pytest.raises(ConfigCompositionException, match="search.step=abc"):
        composed("search.step=abc")
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        composed("selection.no_such_key=1")
    # '+key=' forces a key into the config; the schema check still finds it
    assert unknown_keys(composed("+selection.no_such_key=1")) == ["selection.no_such_key"]
    assert unknown_keys(composed()) == []


def test_semantic_errors_before_anything_runs(tmp_path):
    cfg = to_plain(composed("pool=example_local"))
    with pytest.raises(ConfigError, match="checkpoint 'model_a' not found"):
        validate(cfg)
    cfg = to_plain(composed("selection.tie_break=coin"))
    with pytest.raises(ConfigError, match="tie_break"):
        validate(cfg)
    for override, needle in (("strategy=fixed", "strategy=fixed needs strategy.ingredients"),
                             ("demo.preset=huge", "demo.preset must be one of"),
                             ("dtype=float17", "dtype must be one of"),
                             ("device=tpu", "device must be auto, cpu, cuda or cuda:N")):
        with pytest.raises(ConfigError, match=needle):
            validate(to_plain(composed(override)))


@pytest.mark.parametrize(("override", "needle"), [
    ("benchmark.objective=median", "benchmark.objective must be one of mean, official"),
    ("benchmark.backend=helm", "unknown benchmark.backend 'helm'"),
    ("search.budget=0", "search.budget must be > 0"),
    ("benchmark.holdout.split=test", "select_split and report_split must differ"),
])
def test_new_fields_are_checked(override, needle):
    cfg = to_plain(composed(override))
    if "holdout" in override:
        cfg["benchmark"]["report_split"] = cfg["benchmark"]["select_split"]
    with pytest.raises(ConfigError, match=needle):
        validate(cfg)
