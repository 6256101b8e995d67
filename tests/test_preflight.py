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
    for override, needle in (
        ("strategy=fixed", "strategy=fixed needs strategy.ingredients"),
        ("demo.preset=huge", "demo.preset must be one of"),
        ("dtype=float17", "dtype must be one of"),
        ("device=tpu", "device must be auto, cpu, cuda or cuda:N"),
    ):
        with pytest.raises(ConfigError, match=needle):
            validate(to_plain(composed(override)))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("benchmark.objective=median", "benchmark.objective must be one of mean, official"),
        ("benchmark.backend=helm", "unknown benchmark.backend 'helm'"),
        ("search.budget=0", "search.budget must be > 0"),
        ("benchmark.holdout.split=test", "select_split and report_split must differ"),
    ],
)
def test_new_fields_are_checked(override, needle):
    cfg = to_plain(composed(override))
    if "holdout" in override:
        cfg["benchmark"]["report_split"] = cfg["benchmark"]["select_split"]
    with pytest.raises(ConfigError, match=needle):
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["benchmark.objective=official", "benchmark.limit=5"], "benchmark.objective=official with benchmark.limit=5"),
        (
            ["search.min_weight=0.6", "selection.max_experts=2"],
            "fits at most 1 experts, but the selection can return 2 .*: lower search.min_weight or "
            "selection.max_experts$",
        ),
        (["search.min_weight=0.2"], "fits at most 5 experts, but the selection can return 7 .*max_experts<=5$"),
        (["search=optuna", "search.min_weight=0.3", "demo.preset=fast"], "fits at most 3 experts, but .* return 6"),
        (["benchmark.task='nope_{category}_{split}'"], "lm-eval has no task 'nope_half_dev'"),
    ],
)
def test_values_that_cannot_mean_what_they_say_are_refused_up_front(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(to_plain(composed(*overrides)))


def test_feasible_weights_and_demo_tasks_pass():
    validate(to_plain(composed("search.min_weight=0.2", "selection.max_experts=5")))
    validate(to_plain(composed("search.min_weight=0.6", "strategy=soce_selected")))  # no weight search


def test_infeasible_weights_on_the_command_line_write_nothing(tmp_path):
    import subprocess

    from .conftest import soce_cmd

    p = subprocess.run(
        soce_cmd(
            "search.min_weight=0.6",
            "selection.max_experts=2",
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "search.min_weight=0.6" in lines[0], p.stderr
    assert list(tmp_path.iterdir()) == []


def test_candidates_of_another_architecture_are_refused_before_anything_is_written(tmp_path):
    import json

    for name, heads in (("a", 4), ("b", 4), ("c", 8)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            json.dumps({"model_type": "llama", "num_attention_heads": heads, "eos_token_id": heads})
        )
    cfg = to_plain(composed("pool=example_local"))
    cfg["pool"].update(candidates={n: str(tmp_path / n) for n in "abc"}, population={})
    with pytest.raises(ConfigError, match="differ in 'num_attention_heads', which defines the architecture"):
        validate(cfg)


@pytest.mark.parametrize("bad", ["empty", "pickle_only", "no_config", "not_a_model"])
def test_a_checkpoint_that_cannot_be_evaluated_is_refused_before_anything_loads(tmp_path, bad):
    """A pool path that exists but holds no model (an empty or unrelated folder, pickle-only weights, weights
    without config.json) is one line at preflight, not a transformers traceback after scoring the others
    (pickle-only: refused before transformers would load, and run, the pickle)."""
    from tests.test_soup import make_model

    good = {n: str(make_model(tmp_path / n, i)) for i, n in enumerate("ab")}
    c = tmp_path / "c"
    c.mkdir()
    if bad == "pickle_only":
        (c / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
        (c / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    elif bad == "no_config":
        make_model(c, 2)
        (c / "config.json").unlink()
    elif bad == "not_a_model":
        (c / "notes.txt").write_text("x")
    cfg = to_plain(composed("pool=example_local"))
    cfg["pool"].update(candidates={**good, "c": str(c)}, population={})
    needle = {
        "empty": "pool 'example_local': .*no \\*.safetensors weights in candidate 'c'",
        "not_a_model": "no \\*.safetensors weights in candidate 'c'",
        "pickle_only": "only pickle weights \\(pytorch_model.bin\\) found; pickles can run code",
        "no_config": "checkpoint 'c' at .* has no config.json",
    }[bad]
    with pytest.raises(ConfigError, match=needle) as e:
        validate(cfg)
    assert "\n" not in str(e.value)
    cfg["pool"].update(candidates={**good, "c": str(make_model(tmp_path / "c2", 3))})
    with pytest.raises(ConfigError, match="a demo zoo task: .* set benchmark.task_dir=<a built zoo>/tasks"):
        validate(cfg)  # three real checkpoints pass the pool's checks; the demo benchmark then wants its tasks
