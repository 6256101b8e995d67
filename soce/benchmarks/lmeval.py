"""The lm-eval bridge: a benchmark's tasks are built once, any live model is scored per category.

A category's score is one metric of its task on one split, a fraction in [0, 1]: the task's own primary
metric (:func:`task_metric`) or the one ``benchmark.metric`` names for it; ``overall`` is the unweighted mean
over the categories, computed here so that the weighting is explicit.
Greedy ``generate_until`` requests run on soce's generation engine (:mod:`soce.benchmarks.generation`) where it
runs the model: all requests of a task in one continuous batch, with lm-eval's own tokenization, truncation,
stop strings and post-processing (:func:`engine_lm`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soce.benchmarks import backend
from soce.config import BenchmarkConfig, ConfigError

log = logging.getLogger(__name__)


LONG_PASS_S = 20.0  # an lm-eval pass (requests of one type) running longer shows its bar: items, rate, time left
FEWSHOT_SEED = 1234  # lm-eval's default (what `lm_eval --num_fewshot k` uses): the same shots in every evaluation


@functools.cache
def _tolerant_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that reads lm-eval's ``!function`` tags (and any other) as plain values."""

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return Loader


Benchmark = BenchmarkConfig  # the typed config is the benchmark (declared once, in soce.config)


def benchmark_fingerprint(benchmark: BenchmarkConfig) -> str:
    """Hash of the task definitions and data files, and the settings that change scores."""
    h = hashlib.sha256()
    settings = [
        benchmark.task,
        sorted(benchmark.categories),
        benchmark.metric,
        benchmark.num_fewshot,
        benchmark.limit,
        FEWSHOT_SEED,
    ]
    if benchmark.max_new_tokens is not None:  # absent: keys of earlier runs unchanged
        settings.append(["max_new_tokens", benchmark.max_new_tokens])
    if benchmark.holdout.split:  # carved halves: which items each side holds (absent: keys unchanged)
        h_ = benchmark.holdout
        settings.append(["holdout", h_.split, h_.select_fraction, h_.seed, benchmark.select_split])
    h.update(json.dumps(settings, sort_keys=True).encode())
    if benchmark.task_dir:
        root = Path(benchmark.task_dir).resolve()
        files = [p for p in sorted(root.rglob("*")) if p.is_file()]
        data = sorted({d for p in files if p.suffix in (".yaml", ".yml") for d in _data_files(p)} - set(files))
        for p in [*files, *data]:
            blob = p.read_bytes()
            name = str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
            h.update(f"{name}\0{len(blob)}\0".encode())
            h.update(blob)
    return h.hexdigest()[:16]


def _data_files(task_yaml: Path) -> list[Path]:
    """Local files a task YAML reads through ``dataset_kwargs.data_files`` (absolute, or relative to the YAML
    or the working directory), so that the fingerprint changes with the data, not only with the YAML."""
    import yaml

    try:
        cfg = yaml.load(task_yaml.read_text(), Loader=_tolerant_loader())
    except yaml.YAMLError:
        return []
    spec = (cfg.get("dataset_kwargs") or {}).get("data_files") if isinstance(cfg, dict) else None
    names = [spec] if isinstance(spec, str) else list(spec.values()) if isinstance(spec, dict) else spec or []
    flat = [n for x in names for n in ([x] if isinstance(x, str) else x if isinstance(x, list) else [])]
    found = []
    for n in flat:
        for cand in (Path(n), task_yaml.parent / n):
            if cand.is_file():
                found.append(cand.resolve())
                break
    return found


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def task_manager(task_dir: str | None, include_defaults: bool) -> Any:
    """lm-eval's TaskManager over ``task_dir`` (and its ~15k built-in tasks if ``include_defaults``), indexed
    once per process while the folder's YAML files stay as they are: the preflight's task check and every
    evaluator share it (indexing the built-in tasks takes ~12 s)."""
    return _task_manager(task_dir, include_defaults, _yaml_stamp(task_dir))


def _yaml_stamp(task_dir: str | None) -> tuple:
    """(path, size, mtime) of every task YAML under ``task_dir``: a new or changed task re-indexes."""
    if not task_dir or not Path(task_dir).is_dir():
        return ()
    return tuple(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in Path(task_dir).rglob("*.yaml")))


@functools.cache
def _task_manager(task_dir: str | None, include_defaults: bool, stamp: tuple) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[task_dir] if task_dir else None, include_defaults=include_defaults)


@dataclass
class Evaluator:
    """Scores live models on a benchmark with lm-eval, in process.

    Tasks are indexed and built once per split; each ``score`` call runs ``lm_eval.evaluator.evaluate``
    on them. The model is evaluated as it is at the call (re-mixed weights included); lm-eval's request
    cache is never used, since it is keyed by request, not by model.
    """

    benchmark: Benchmark
    device: str = "cpu"
    _tasks: dict[str, Any] = field(default_factory=dict, repr=False)
    _metrics: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)
    _manager: Any = field(default=None, repr=False)
    _engines: dict[int, Any] = field(default_factory=dict, repr=False)  # id(model) -> Engine, built once

    def fingerprint(self) -> str:
        return benchmark_fingerprint(self.benchmark)

    def tasks(self, split: str) -> Any:
        """lm-eval's task dict for ``split`` (built once per data split; carved halves share it)."""
        split = self.benchmark.source_split(split)
        if split not in self._tasks:
            from lm_eval.tasks import get_task_dict

            if self._manager is None:
                self._manager = task_manager(self.benchmark.task_dir, self.benchmark.include_default_tasks)
            names = [self.benchmark.task_name(c, split) for c in self.benchmark.categories]
            missing = [n for n in names if n not in self._manager.all_tasks]
            if missing:
                raise ConfigError(
                    f"benchmark {self.benchmark.name!r}: lm-eval has no task {missing[0]!r}"
                    + (f" (task_dir={self.benchmark.task_dir})" if self.benchmark.task_dir else "")
                )
            task_dict = get_task_dict(names, self._manager)
            for task in _leaf_tasks(task_dict):
                self._configure(task)
            leaf = {t.config.task: t for t in _leaf_tasks(task_dict)}
            b = self.benchmark
            self._metrics[split] = {c: task_metric(leaf[b.task_name(c, split)], b.metric_of(c)) for c in b.categories}
            self._tasks[split] = task_dict
        return self._tasks[split]

    def _configure(self, task: Any) -> None:
        """Few-shot count and seed, generation budget, requests built once."""
        b = self.benchmark
        if b.num_fewshot is not None:
            task.set_config(key="num_fewshot", value=b.num_fewshot)
        if b.max_new_tokens is not None and task.config.output_type == "generate_until":
            task.set_config(key="generation_kwargs", value={"max_gen_toks": b.max_new_tokens}, update=True)
        task.set_fewshot_seed(FEWSHOT_SEED)  # else lm-eval's sampler is seeded from the OS: random shots
        _build_requests_once(task)

    def metrics(self, split: str) -> dict[str, str]:
        """The lm-eval metric key (``"name,filter"``) each category of ``split`` is scored by."""
        self.tasks(split)
        return dict(self._metrics[self.benchmark.source_split(split)])

    def score(
        self,
        model: Any,
        tokenizer: Any,
        split: str,
        items: dict[str, list[str]] | None = None,
        log_samples: bool = True,
    ) -> dict[str, Any]:
        """Scores of ``model`` on ``split`` (the :mod:`soce.benchmarks` contract); ``items`` restricts each
        category to those doc ids (lm-eval's ``samples``)."""
        from lm_eval.evaluator import evaluate

        lm = engine_lm(model, tokenizer, self.benchmark.batch_size, self._engines)
        chosen = self.doc_ids(split, items)
        results = evaluate(
            lm=lm,
            task_dict=self.tasks(split),
            limit=self.benchmark.limit if chosen is None else None,
            samples=None if chosen is None else {self.benchmark.task_name(c, split): ids for c, ids in chosen.items()},
            bootstrap_iters=0,
            log_samples=log_samples or chosen is not None,
            verbosity="WARNING",
        )
        return category_scores(
            results, self.benchmark, split, log_samples or chosen is not None, chosen, self.metrics(split)
        )

    def item_ids(self, split: str) -> dict[str, list[str]]:
        """Every item id (lm-eval doc id) of ``split`` per category, carved halves applied."""
        from soce.benchmarks.holdout import carve, side

        b, tasks = self.benchmark, self.tasks(split)
        leaf = {t.config.task: t for t in _leaf_tasks(tasks)}
        ids = {}
        for c in b.categories:
            n = len(list(leaf[b.task_name(c, split)].eval_docs))
            ids[c] = [str(i) for i in range(n if b.limit is None else min(n, b.limit))]
        if not b.holdout.split:
            return ids
        return carve(ids, b.holdout.select_fraction, b.holdout.seed)[side(b.select_split, b.report_split, split)]

    def demands(self, splits: list[str]) -> list[Any]:
        """What the items of ``splits`` ask of a model (:mod:`soce.benchmarks.fitness`): per category, the
        request texts of its longest documents (few-shot context + continuation, or the context of a
        generation) and the generation budget (``max_gen_toks``; lm-eval's default 256). Only the documents
        longest in JSON are rendered, so the check costs milliseconds however many items there are."""
        from soce.benchmarks.fitness import LONGEST, Demand, longest

        b, out = self.benchmark, []
        for c in b.categories:
            texts, new = [], 0
            for split in dict.fromkeys(b.source_split(s) for s in splits):
                task = {t.config.task: t for t in _leaf_tasks(self.tasks(split))}[b.task_name(c, split)]
                docs = sorted(list(task.eval_docs)[: b.limit], key=lambda d: -len(json.dumps(d, default=str)))
                for doc in docs[: 2 * LONGEST]:
                    text, gen = request_text(task, doc)
                    texts.append(text)
                    new = max(new, gen)
            out.append(Demand(c, longest(texts), new))
        return out

    def item_keys(self, split: str) -> dict[str, list[str]]:
        """Each item's content per category of ``split`` (``benchmark.limit`` first ones, carving not applied):
        a hash of its document's fields, id fields left out (``id``, ``*_id``, ``idx``), so that the same
        question under another id is the same item (:mod:`soce.benchmarks.splits` compares splits with it)."""
        b = self.benchmark
        leaf = {t.config.task: t for t in _leaf_tasks(self.tasks(split))}
        return {
            c: [content_key(d) for d in list(leaf[b.task_name(c, split)].eval_docs)[: b.limit]] for c in b.categories
        }

    def doc_ids(self, split: str, items: dict[str, list[str]] | None) -> dict[str, list[int]] | None:
        """lm-eval ``samples`` per category for ``split`` and ``items``; None: the whole split."""
        if items is None and not self.benchmark.holdout.split:
            return None
        allowed = self.item_ids(split)
        if items is None:
            return {c: sorted(int(i) for i in ids) for c, ids in allowed.items()}
        bad = [(c, i) for c, ids in items.items() for i in ids if c not in allowed or str(i) not in set(allowed[c])]
        if bad:
            raise ValueError(f"item {bad[0][1]!r} of category {bad[0][0]!r} is not in split {split!r}")
        return {c: sorted(int(i) for i in items.get(c, [])) for c in self.benchmark.categories}


@backend("lm_eval")
def make_lm_eval(benchmark: BenchmarkConfig, device: str) -> Evaluator:
    """The lm-eval backend: one task per category (``benchmark.task``), scored in process."""
    return Evaluator(benchmark, device)


def engine_lm(model: Any, tokenizer: Any, batch_size: int, engines: dict[int, Any] | None = None) -> Any:
    """lm-eval's HFLM over ``model`` whose greedy ``generate_until`` runs on the generation engine (built on first
    use, kept in ``engines`` by model); sampled generation and unsupported models keep HF ``generate``."""
    from lm_eval.models.huggingface import HFLM

    from soce.benchmarks import generation

    class EngineLM(HFLM):
        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            saved = self.batch_size_per_gpu
            if generation.supported(self.model):
                self.batch_size_per_gpu = max(1, len(requests))  # one continuous batch per kind of request
            try:
                return super().generate_until(requests, disable_tqdm)
            finally:
                self.batch_size_per_gpu = saved

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **kwargs: Any) -> Any:
            greedy = not kwargs.get("do_sample") and not kwargs.get("temperature")
            if not greedy or not generation.supported(self.model):
                return super()._model_generate(context, max_length, stop, **kwargs)
            cache = engines if engines is not None else {}
            if id(self.model) not in cache:
                cache.clear()
                cache[id(self.model)] = generation.Engine(self.model, tokenizer=self.tokenizer)
            engine = cache[id(self.model)]
            return _engine_generate(engine, self, context, max_length, stop, kwargs.get("attention_mask"))

    return EngineLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _engine_generate(engine: Any, lm: Any, context: Any, max_length: int, stop: list[str], mask: Any) -> Any:
    """What HF ``generate`` returns for lm-eval's left-padded ``context``: each row's context then its new tokens,
    padded with the pad token; a row stops at an eos id (the model's generation config) or a stop string."""
    import torch

    from soce.benchmarks.generation import Request

    eos = lm.model.generation_config.eos_token_id
    stops = frozenset([eos] if isinstance(eos, int) else eos or [])
    keep = mask.bool().cpu() if mask is not None else torch.ones_like(context, dtype=torch.bool, device="cpu")
    rows = context.cpu()
    new = max_length - context.shape[1]
    reqs = [Request(row[k].tolist(), new, stops, tuple(stop)) for row, k in zip(rows, keep, strict=True)]
    engine.generate(reqs)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    width = max(len(r.out) for r in reqs)
    out = [r.out + [pad] * (width - len(r.out)) for r in reqs]
    return torch.cat([rows, torch.tensor(out, dtype=rows.dtype).reshape(len(reqs), width)], dim=1).to(context.device)


def metric_key(metric: str) -> tuple[str, str]:
    """``"acc"`` -> ("acc", "none"); ``"exact_match,flexible-extract"`` -> ("exact_match", "flexible-extract"):
    lm-eval reports each metric under ``<metric>,<filter>``, and tasks with a filter_list have no ``none``."""
    name, _, filt = metric.partition(",")
    return name, filt or "none"


PRIMARY = {"generate_until": "exact_match", "multiple_choice": "acc", "loglikelihood": "acc"}  # by output type
NOT_FRACTIONS = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


def task_metric(task: Any, asked: str | None) -> str:
    """The ``"name,filter"`` key a category is scored by, checked against what ``task`` computes before any
    evaluation. ``asked`` None: the task's primary metric (the first of its ``metric_list``, else
    :data:`PRIMARY` of its output type) under its ``none`` filter, else its first filter; a name without a
    filter takes the same filter. ConfigError (one line naming the task and what it reports) when the task
    does not compute it, or when it is not a fraction in [0, 1] (perplexities)."""
    cfg = task.config
    computed = [m for m in task.aggregation() if isinstance(m, str)]
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    reports = ", ".join(f"{m},{f}" for m in computed for f in filters)
    if asked is None:
        listed = [m.get("metric") for m in cfg.metric_list or [] if isinstance(m, dict)]
        name = listed[0] if listed and isinstance(listed[0], str) else PRIMARY.get(cfg.output_type, "acc")
        filt = None
    else:
        name, _, filt = asked.partition(",")
        name, filt = name.strip(), filt.strip() or None
    filt = filt or ("none" if "none" in filters else filters[0])
    if name not in computed or filt not in filters:
        raise ConfigError(
            f"task {cfg.task!r} reports no metric '{name},{filt}' (it reports: {reports}); set "
            f"benchmark.metric (one name, or {{category: name}}) to one of them"
        )
    if name in NOT_FRACTIONS:
        raise ConfigError(
            f"task {cfg.task!r}: metric {name!r} is not a fraction in [0, 1] (it reports: {reports}); "
            f"set benchmark.metric to an accuracy-like one"
        )
    return f"{name},{filt}"


def category_scores(
    results: dict[str, Any],
    benchmark: Benchmark,
    split: str,
    log_samples: bool = True,
    chosen: dict[str, list[int]] | None = None,
    metrics: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Per-category scores (+ "overall", their mean, + "samples" and "item_ids" per item, by doc_id) from the
    output of ``lm_eval.evaluator.evaluate``, each category by its metric key (``metrics``, from
    :func:`task_metric`; default: ``benchmark.metric``'s, "acc" if unset). Categories with no chosen item
    are left out of the scores. A category score outside [0, 1] is a ConfigError naming task and metric."""
    keys = {
        c: "{},{}".format(*metric_key((metrics or {}).get(c) or benchmark.metric_of(c) or "acc"))
        for c in benchmark.categories
    }
    cats = [c for c in benchmark.categories if chosen is None or chosen.get(c)]
    out: dict[str, Any] = {}
    for c in cats:
        task, key = benchmark.task_name(c, split), keys[c]
        res = results["results"][task]
        if key not in res:
            have = sorted(k for k in res if "," in k and not k.split(",")[0].endswith("_stderr"))
            raise ConfigError(
                f"task {task!r} reports no metric {key!r} (it reports: {', '.join(have)}; "
                f"set benchmark.metric to one of them)"
            )
        out[c] = float(res[key])
        if not 0 <= out[c] <= 1:
            raise ConfigError(
                f"task {task!r}: metric {key!r} = {out[c]:g} is not a fraction in [0, 1]; "
                f"set benchmark.metric to an accuracy-like one"
            )
    if len(cats) == len(benchmark.categories):
        out["overall"] = sum(out[c] for c in cats) / len(cats)
    if log_samples:
        out["samples"] = {}
        if chosen is not None:
            out["item_ids"] = {}
        for c in cats:
            name, filt = keys[c].split(",", 1)
            rows = sorted(
                (s for s in results["samples"][benchmark.task_name(c, split)] if s.get("filter", "none") == filt),
                key=lambda s: s["doc_id"],
            )
            out["samples"][c] = [float(s[name]) for s in rows]
            if chosen is not None:
                out["item_ids"][c] = [str(s["doc_id"]) for s in rows]
    return out


def content_key(doc: Any) -> str:
    """A document's content as a short hash, its id fields (``id``, ``idx``, ``*_id``) left out."""
    if isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if not (k.lower() in ("id", "idx") or k.lower().endswith("_id"))}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def request_text(task: Any, doc: dict) -> tuple[str, int]:
    """(the longest text lm-eval will score or continue for ``doc``, new tokens it may generate): the few-shot
    context plus the longest continuation (target or choice), or the context and ``max_gen_toks``."""
    cfg = task.config
    ctx = task.fewshot_context(doc, cfg.num_fewshot or 0)
    ctx = ctx if isinstance(ctx, str) else "".join(map(str, ctx))
    if cfg.output_type == "generate_until":
        return ctx, int((cfg.generation_kwargs or {}).get("max_gen_toks", 256))
    conts = task.doc_to_choice(doc) if cfg.output_type == "multiple_choice" else [task.doc_to_target(doc)]
    return ctx + (cfg.target_delimiter or "") + max(map(str, conts), key=len), 0


def _build_requests_once(task: Any) -> None:
    """Make ``task.build_all_requests`` build lm-eval's request Instances once and hand out fresh copies
    (empty responses) on later calls with the same arguments, and remember ``task.doc_to_target`` per
    document. lm-eval redoes both at every ``evaluate``, compiling every document's Jinja templates anew:
    most of a search point's evaluation time on small models. (lm-eval's own ``cache_requests`` is keyed by
    task name only and kept on disk: a changed task file or data set with the same name would be served
    stale requests, so it stays off.)"""
    build, to_target = task.build_all_requests, task.doc_to_target
    built: dict[str, list[Any]] = {}
    targets: dict[str, Any] = {}  # document's content -> target (lm-eval hands out new dicts at every pass)

    def doc_to_target(doc: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not isinstance(doc, dict):
            return to_target(doc, *args, **kwargs)
        key = json.dumps(doc, sort_keys=True, default=repr)
        if key not in targets:
            targets[key] = to_target(doc)
        return targets[key]

    def fresh(instances: list[Any]) -> list[Any]:
        return [dataclasses.replace(i, resps=[], filtered_resps={}) for i in instances]

    def build_once(**kwargs: Any) -> None:
        key = repr(sorted((k, v) for k, v in kwargs.items() if not callable(v)))
        if key not in built:
            build(**kwargs)
            built[key] = fresh(task.instances)
        task._instances = fresh(built[key])

    task.build_all_requests = build_once
    task.doc_to_target = doc_to_target


def _leaf_tasks(task_dict: Any) -> list[Any]:
    """The leaf Task objects of a ``get_task_dict`` result, groups (nested dicts) included."""
    if not isinstance(task_dict, dict):
        return []
    out: list[Any] = []
    for v in task_dict.values():
        out.extend(_leaf_tasks(v) if isinstance(v, dict) else [v] if hasattr(v, "set_config") else [])
    return out


def pick_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str, device: str = "cpu", dtype: str | None = None) -> tuple[Any, Any]:
    """A checkpoint as (model, tokenizer) for evaluation; never runs remote code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tokenizer


def quiet_lm_eval() -> None:
    """lm-eval logs every task build at INFO; keep job logs readable."""
    for name in ("lm_eval", "lm-eval", "lm_eval.evaluator", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Passed an already-initialized model": intended, once per evaluation
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    # lm-eval draws several progress bars per evaluation (building requests, tokenizing, running); a
    # search runs hundreds of short evaluations and soce shows its own bars over them, so lm-eval's appear
    # only for a long pass (a large benchmark, a slow model): items done, rate, time left
    import importlib

    from tqdm import tqdm

    def silent_tqdm(*args: Any, **kwargs: Any) -> tqdm:  # shown only once a pass has run LONG_PASS_S seconds
        return tqdm(*args, **{**kwargs, "delay": LONG_PASS_S, "leave": False, "mininterval": 2.0})

    for module in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface"):
        mod = importlib.import_module(module)
        if getattr(mod, "tqdm", None) is tqdm:
            mod.tqdm = silent_tqdm
    # transformers' "Loading weights" bar at every checkpoint load, datasets' "Generating test split" per task
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_warning()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
