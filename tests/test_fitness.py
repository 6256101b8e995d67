"""Models checked against the benchmark before any evaluation: context length and chat markup, one line each."""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from soce.benchmarks.fitness import Demand, check_fitness, context_length
from soce.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(path: Path, max_len: int = 64, seed: int = 0) -> str:
    """A real (tiny) character-level Llama checkpoint with a ``max_len``-token context, saved in a second."""
    from soce.demo.train import ModelShape, make_model, make_tokenizer

    make_model(ModelShape(hidden=16, layers=1, heads=2, mlp=32, max_len=max_len), seed).save_pretrained(path)
    make_tokenizer(max_len).save_pretrained(path)
    return str(path)


@dataclass
class Asks:
    """A stand-in backend that asks what it is told."""

    asked: list

    def demands(self, splits):
        return self.asked


def test_context_and_markup_checked_one_line_naming_models_and_fix(tmp_path):
    models = {"a": tiny_checkpoint(tmp_path / "a"), "b": tiny_checkpoint(tmp_path / "b", seed=1)}
    assert context_length(models["a"]) == 64
    check_fitness(Asks([Demand("short", ("abc=",), 8)]), models, ["dev"])  # fits: nothing raised
    check_fitness(object(), models, ["dev"])  # a backend that does not describe its demands is not checked

    with pytest.raises(ConfigError) as e:
        check_fitness(Asks([Demand("long", ("x" * 100,), 0), Demand("short", ("ab",), 0)]), models, ["dev"])
    line = str(e.value)
    assert "\n" not in line and line.startswith("models a, b: a prompt of category 'long' is 100 tokens")
    assert "context of 64 tokens (1 of 2 categories do not fit)" in line and "another pool" in line

    with pytest.raises(ConfigError, match=r"'gen' is 40 tokens \+ 256 new tokens.*benchmark.max_new_tokens=24 or less"):
        check_fitness(Asks([Demand("gen", ("y" * 40,), 256)]), models, ["dev"])

    with pytest.raises(
        ConfigError,
        match=r"the tokenizer has no <\|eot_id\|>, which the benchmark's prompt format "
        r"writes.*, or another handler",
    ):
        check_fitness(Asks([Demand("chat", ("ab",), 0, ("<|eot_id|>",), "another handler")]), models, ["dev"])


def test_models_with_other_contexts_are_named_apart(tmp_path):
    models = {"short": tiny_checkpoint(tmp_path / "s", 32), "long": tiny_checkpoint(tmp_path / "l", 256)}
    with pytest.raises(ConfigError, match=r"^model short: a prompt of category 'c' is 100 tokens"):
        check_fitness(Asks([Demand("c", ("z" * 100,), 0)]), models, ["dev"])


def test_lm_eval_backend_describes_its_items(monkeypatch):
    """The own benchmark's tasks: generation budget from the task's max_gen_toks (or benchmark.max_new_tokens),
    none for scored continuations; the longest request texts."""
    from soce.benchmarks.lmeval import Evaluator
    from soce.config import BenchmarkConfig

    monkeypatch.chdir(ROOT)  # the example's data_files are relative to the repo root
    b = BenchmarkConfig(
        name="own",
        categories=["mirror", "times4", "swap"],
        task="own_{category}_{split}",
        task_dir="examples/own_benchmark/tasks",
    )
    got = {d.category: d for d in Evaluator(b).demands(["dev", "test"])}
    assert got["mirror"].new_tokens == 8 and got["times4"].new_tokens == 0 and got["swap"].new_tokens == 0
    assert got["mirror"].prompts[0].startswith("rev ") and got["times4"].prompts[0].startswith("quad ")
    b.max_new_tokens = 3
    assert {d.category: d.new_tokens for d in Evaluator(b).demands(["dev"])}["mirror"] == 3


def test_bfcl_on_a_short_context_model_is_refused_in_one_line_in_seconds(tmp_path):
    """The issue's case: tiny checkpoints (64-token context, no Llama chat tokens) on benchmark=bfcl_v3 ran for
    minutes with memory growing; now the job is refused before any evaluation."""
    pytest.importorskip("bfcl_eval", reason="make bfcl")
    pool = tmp_path / "conf" / "pool"
    pool.mkdir(parents=True)
    paths = {n: tiny_checkpoint(tmp_path / n, seed=i) for i, n in enumerate(("a", "b", "c"))}
    (pool / "tiny.yaml").write_text(
        "name: tiny\nsource: paths\ncandidates: {" + ", ".join(f"{n}: {p}" for n, p in paths.items()) + "}\n"
    )
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "soce",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "pool=tiny",
            "benchmark=bfcl_v3",
            "benchmark.limit=2",
            "strategy=uniform",
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - t0
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("soce: error: models a, b, c: a prompt of category") and "context of 64 tokens" in last
    assert "another pool" in last
    assert not (tmp_path / "outputs" / "cache").exists()  # nothing was evaluated
    assert seconds < 120, seconds  # ~15 s on a loaded 2-core machine (bfcl-eval's import included)
