"""The lm-eval bridge: requests built once per task and handed out fresh, scores unchanged by that."""

from __future__ import annotations

import pytest

from soce.benchmarks.lmeval import Benchmark, Evaluator, benchmark_fingerprint, load_model
from soce.config import DemoConfig
from soce.demo.zoo import build_demo


def _evaluator(man: dict) -> Evaluator:
    bench = Benchmark(name="demo", categories=man["categories"], task=man["task_template"], task_dir=man["task_dir"])
    return Evaluator(bench, "cpu")


def test_requests_built_once_and_handed_out_fresh(tmp_path, monkeypatch):
    from lm_eval.api.task import ConfigurableTask

    builds = []
    original = ConfigurableTask.build_all_requests

    def counting(self, **kw):
        builds.append(kw["limit"])
        return original(self, **kw)

    monkeypatch.setattr(ConfigurableTask, "build_all_requests", counting)
    man = build_demo(DemoConfig(seed=0, preset="tiny", root=str(tmp_path)), progress=False)
    ev = _evaluator(man)
    task = ev.tasks("dev")[ev.benchmark.task_name(man["categories"][0], "dev")]
    kw = dict(
        limit=None,
        samples=None,
        rank=0,
        world_size=1,
        cache_requests=False,
        rewrite_requests_cache=False,
        system_instruction=None,
        apply_chat_template=False,
        fewshot_as_multiturn=False,
        chat_template=None,
        tokenizer_name="",
    )
    task.build_all_requests(**kw)
    first = task.instances
    assert len(first) == 40 and all(i.resps == [] for i in first)
    for i in first:  # what evaluate() does with them
        i.resps.append((-1.0, True))
        i.filtered_resps["none"] = (-1.0, True)
    task.build_all_requests(**kw)
    second = task.instances
    assert builds == [None]  # built once
    assert [i.arguments for i in second] == [i.arguments for i in first]
    assert [(i.doc_id, i.task_name) for i in second] == [(i.doc_id, i.task_name) for i in first]
    assert all(i.resps == [] and i.filtered_resps == {} for i in second)
    assert all(a is not b for a, b in zip(first, second, strict=True))
    task.build_all_requests(**{**kw, "limit": 5})  # other arguments: built for them
    assert builds == [None, 5] and len(task.instances) == 5
    assert task.doc_to_target(first[0].doc) == task.doc_to_target(dict(first[0].doc))  # by content


@pytest.mark.slow
def test_reused_evaluator_scores_like_a_fresh_one(tiny_demo_root):
    """A search scores many models with one Evaluator: each score equals a fresh Evaluator's, per item."""
    man = build_demo(DemoConfig(seed=0, preset="fast", root=str(tiny_demo_root)), progress=False)
    a, b = list(man["candidates"].values())[:2]
    ev = _evaluator(man)
    ev.score(*load_model(a, "cpu"), "dev")
    got = ev.score(*load_model(b, "cpu"), "dev")
    want = _evaluator(man).score(*load_model(b, "cpu"), "dev")
    assert got == want
    assert 0 < got["overall"] < 1


def test_few_shot_contexts_are_seeded(tmp_path):
    """lm-eval seeds its few-shot sampler from the OS unless told: two evaluators must build the same shots."""
    man = build_demo(DemoConfig(seed=0, preset="tiny", root=str(tmp_path)), progress=False)
    contexts = []
    for _ in range(2):
        ev = _evaluator(man)
        ev.benchmark.num_fewshot = 3
        task = ev.tasks("dev")[ev.benchmark.task_name(man["categories"][0], "dev")]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        contexts.append([i.arguments[0] for i in task.instances])
    assert contexts[0] == contexts[1]
    assert contexts[0][0].count("\n") >= 3  # the shots are there


def test_category_scores_reads_the_metric_under_its_filter():
    from soce.benchmarks.lmeval import category_scores, metric_key

    assert metric_key("acc") == ("acc", "none")
    assert metric_key("exact_match,flexible-extract") == ("exact_match", "flexible-extract")
    bench = Benchmark(name="m", categories=["en", "de"], task="mgsm_{category}", metric="exact_match,flexible-extract")
    samples = lambda v: [  # noqa: E731  (lm-eval logs one sample per document and filter)
        {"doc_id": 1, "filter": "remove_whitespace", "exact_match": 0.0},
        {"doc_id": 1, "filter": "flexible-extract", "exact_match": v},
        {"doc_id": 0, "filter": "flexible-extract", "exact_match": 1.0},
        {"doc_id": 0, "filter": "remove_whitespace", "exact_match": 1.0},
    ]
    results = {
        "results": {
            f"mgsm_{c}": {
                "exact_match,remove_whitespace": 0.5,
                "exact_match,flexible-extract": v,
                "exact_match_stderr,flexible-extract": "N/A",
            }
            for c, v in (("en", 1.0), ("de", 0.5))
        },
        "samples": {"mgsm_en": samples(1.0), "mgsm_de": samples(0.0)},
    }
    out = category_scores(results, bench, "test")
    assert out["en"] == 1.0 and out["de"] == 0.5 and out["overall"] == 0.75
    assert out["samples"] == {"en": [1.0, 1.0], "de": [1.0, 0.0]}  # one per document, by doc_id, this filter only
    bench.metric = "exact_match"
    with pytest.raises(
        ValueError,
        match=r"no metric 'exact_match,none' \(it reports: exact_match,flexible-extract, "
        r"exact_match,remove_whitespace",
    ):
        category_scores(results, bench, "test")


def test_leaf_tasks_walks_groups():
    from soce.benchmarks.lmeval import _leaf_tasks

    class T:
        def set_config(self, **kw):
            pass

    a, b, c = T(), T(), T()
    assert _leaf_tasks({"a": a, "group": {"b": b, "sub": {"c": c}}, "x": 1}) == [a, b, c]


def test_fingerprint_follows_data_files_outside_the_task_dir(tmp_path):
    data = tmp_path / "data" / "d.jsonl"
    data.parent.mkdir()
    data.write_text('{"prompt": "a", "target": "b"}\n')
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text(
        f"task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "process_docs: !function utils.process\n"
    )
    bench = Benchmark(name="x", categories=["c"], task="t", task_dir=str(tasks))
    before = benchmark_fingerprint(bench)
    assert benchmark_fingerprint(bench) == before
    data.write_text('{"prompt": "a", "target": "X"}\n')  # same YAML, other gold answer
    assert benchmark_fingerprint(bench) != before


def test_task_index_is_built_once_per_process_until_a_task_changes(tmp_path):
    """The preflight and every evaluator share one lm-eval TaskManager per task folder (indexing is slow);
    a task YAML added or changed in the folder re-indexes it."""
    from soce.benchmarks.lmeval import task_manager

    (tmp_path / "a.yaml").write_text("task: soce_idx_a\ndataset_path: json\noutput_type: loglikelihood\n")
    first = task_manager(str(tmp_path), False)
    assert task_manager(str(tmp_path), False) is first and "soce_idx_a" in first.all_tasks
    (tmp_path / "b.yaml").write_text("task: soce_idx_b\ndataset_path: json\noutput_type: loglikelihood\n")
    again = task_manager(str(tmp_path), False)
    assert again is not first and "soce_idx_b" in again.all_tasks


def _own(monkeypatch, **kw) -> Evaluator:
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the example's data_files are relative to the repo root
    return Evaluator(
        Benchmark(
            name="own",
            categories=["mirror", "times4", "swap"],
            task="own_{category}_{split}",
            task_dir="examples/own_benchmark/tasks",
            **kw,
        )
    )


def test_each_category_is_scored_by_its_tasks_own_metric(monkeypatch):
    """generate_until -> exact_match, multiple_choice and loglikelihood -> acc, with no option set."""
    assert _own(monkeypatch).metrics("dev") == {"mirror": "exact_match,none", "times4": "acc,none", "swap": "acc,none"}
    per_category = _own(monkeypatch, metric={"mirror": "exact_match", "times4": "acc,none"}).metrics("test")
    assert per_category == {"mirror": "exact_match,none", "times4": "acc,none", "swap": "acc,none"}  # swap: its own


def test_a_metric_a_task_does_not_report_is_one_line_naming_the_task(monkeypatch):
    with pytest.raises(ValueError) as e:
        _own(monkeypatch, metric="acc").metrics("dev")
    assert str(e.value) == (
        "task 'own_mirror_dev' reports no metric 'acc,none' (it reports: exact_match,none); set "
        "benchmark.metric (one name, or {category: name}) to one of them"
    )
    with pytest.raises(ValueError, match=r"task 'own_swap_dev': metric 'perplexity' is not a fraction in \[0, 1\]"):
        _own(monkeypatch, metric={"swap": "perplexity"}).metrics("dev")
    with pytest.raises(
        ValueError,
        match=r"^task 'own_times4_test' reports no metric 'acc_norm,none' \(it reports: "
        r"acc,none\)",
    ):
        _own(monkeypatch, metric={"times4": "acc_norm"}).metrics("test")


def test_benchmark_metric_is_checked_in_the_config():
    from soce.config import ConfigError

    b = Benchmark(name="b", categories=["x", "y"], metric={"z": "acc"})
    with pytest.raises(ConfigError, match=r"benchmark.metric names 'z', not a category of benchmark 'b' \(x, y\)"):
        b.validate()
    b.metric = {"x": "acc"}
    b.validate()
    assert b.metric_of("x") == "acc" and b.metric_of("y") is None
    b.metric = 3
    with pytest.raises(ConfigError, match="benchmark.metric must be null, a name or"):
        b.validate()
