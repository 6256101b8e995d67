"""BFCL v3 (Berkeley Function-Calling Leaderboard) as a soce benchmark backend, on bfcl-eval 2025.6.15.

Categories are BFCL's v3 test categories (``simple`` is python simple; java and javascript included); item
ids are BFCL entry ids (a repeated id gets ``#k``, see :func:`unique_ids`). The package supplies the data,
ground truth, prompt formats (its handlers), the single- and multi-turn inference loops and the checkers;
soce supplies generation with the live model (:mod:`soce.benchmarks.bfcl_gen`) and per-item results: each
category is checked by bfcl-eval's own file runner (``ast_file_runner``, ``relevance_file_runner``,
``multi_turn_runner``), whose score file lists the failed entries. Item scores are 0/1; irrelevance and
relevance score whether a call was decoded (they have no ground truth).

Every evaluation runs under a new model name, and the multi-turn APIs' instances that bfcl-eval keeps in
module globals under that name are deleted afterwards (:func:`purge_state`): bfcl-eval never clears them,
so a later evaluation under the same name would execute on a stale state.

``benchmark.options``: ``handler`` (``llama``: BFCL's python-call prompt, LlamaHandler; ``xlam``: JSON tool
calls, SalesforceLlamaHandler), ``max_new_tokens``, ``stop_tokens``, ``max_batch_tokens``, ``engine`` (``auto``:
soce's generation engine, :mod:`soce.benchmarks.generation`, where it runs the model; ``hf``: HF ``generate``);
``benchmark.batch_size`` is the number of queries generated together. ``benchmark.objective``: ``mean``
(the paper's: unweighted mean of categories) or ``official`` (the v3 leaderboard's overall, see
:func:`official_overall`); the scores hold both as ``overall_mean`` and ``overall_official``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soce.benchmarks import backend, bfcl_sdk
from soce.benchmarks.bfcl_gen import Generate, GenSettings, engine_generator, run_entries
from soce.config import BenchmarkConfig, ConfigError

SIMPLE = ("simple", "java", "javascript")
NON_LIVE = (*SIMPLE, "multiple", "parallel", "parallel_multiple", "irrelevance")
LIVE = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance", "live_relevance")
MULTI_TURN = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
CATEGORIES = (*NON_LIVE, *LIVE, *MULTI_TURN)  # the 17 v3 categories
# handler option -> (bfcl-eval module, class, a registered model of that format: the AST checker looks up
# its underscore_to_dot flag when function names contain dots)
HANDLERS = {
    "llama": ("llama", "LlamaHandler", "meta-llama/Llama-3.1-8B-Instruct"),
    "xlam": ("salesforce_llama", "SalesforceLlamaHandler", "Salesforce/Llama-xLAM-2-8b-fc-r"),
}
OPTION_KEYS = ("handler", "max_new_tokens", "stop_tokens", "max_batch_tokens", "engine")
ENGINES = ("auto", "hf")
_RUNS = itertools.count()
log = logging.getLogger(__name__)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def official_overall(scores: dict[str, float], counts: dict[str, int]) -> float:
    """BFCL v3's Overall: mean(NonLive, Live, MultiTurn), unweighted; NonLive = mean(Simple, multiple, parallel,
    parallel_multiple, irrelevance) with Simple = mean(simple, java, javascript); Live = the live categories'
    mean weighted by ``counts`` (items per category); MultiTurn = mean of the multi_turn categories."""
    non_live = _mean(
        [
            _mean([scores[c] for c in SIMPLE]),
            *(scores[c] for c in ("multiple", "parallel", "parallel_multiple", "irrelevance")),
        ]
    )
    live = sum(scores[c] * counts[c] for c in LIVE) / sum(counts[c] for c in LIVE)
    return _mean([non_live, live, _mean([scores[c] for c in MULTI_TURN])])


def options(benchmark: BenchmarkConfig) -> tuple[str, GenSettings]:
    """(handler, generation settings) from ``benchmark.options``; ConfigError on unknown keys or values."""
    opts = dict(benchmark.options or {})
    unknown = sorted(set(opts) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"benchmark.options.{unknown[0]}: unknown for backend bfcl (known: {', '.join(OPTION_KEYS)})")
    handler = opts.pop("handler", "llama")
    if handler not in HANDLERS:
        raise ConfigError(f"benchmark.options.handler must be one of {', '.join(HANDLERS)}, got {handler!r}")
    if "stop_tokens" in opts:
        opts["stop_tokens"] = tuple(opts["stop_tokens"])
    if benchmark.max_new_tokens is not None:  # the declared key wins over options.max_new_tokens
        opts["max_new_tokens"] = benchmark.max_new_tokens
    settings = GenSettings(**opts)
    if settings.engine not in ENGINES:
        raise ConfigError(f"benchmark.options.engine must be one of {', '.join(ENGINES)}, got {settings.engine!r}")
    if settings.max_new_tokens < 1 or settings.max_batch_tokens < 1:
        raise ConfigError("benchmark.options.max_new_tokens and max_batch_tokens must be >= 1")
    return handler, settings


def check_config(benchmark: BenchmarkConfig) -> None:
    """ConfigError (one line) for a bfcl benchmark that cannot run: unknown categories, objective, options."""
    bad = [c for c in benchmark.categories if c not in CATEGORIES]
    if bad:
        raise ConfigError(
            f"benchmark {benchmark.name!r}: {bad[0]!r} is not a BFCL v3 category (categories: {', '.join(CATEGORIES)})"
        )
    if benchmark.objective == "official" and set(benchmark.categories) != set(CATEGORIES):
        raise ConfigError("benchmark.objective=official needs all 17 BFCL v3 categories")
    options(benchmark)


@functools.cache
def load_category(category: str) -> tuple[tuple[dict, ...], tuple[dict, ...] | None]:
    """(entries, ground truth) of one category as bfcl-eval ships them, sorted by id as its runner sorts them
    (multi-turn entries with their function docs, as its generation step prepares them); ground truth is None
    for irrelevance/relevance. Cached: callers copy before mutating."""
    bfcl = bfcl_sdk.load()
    cfg, utils = bfcl.eval_config, bfcl.utils
    name = bfcl.category_mapping.TEST_FILE_MAPPING[category]
    entries = unique_ids(utils.load_file(cfg.PROMPT_PATH / name, sort_by_id=True))
    if utils.is_multi_turn(category):
        entries = bfcl._llm_response_generation.process_multi_turn_test_case(entries)
    if utils.is_relevance_or_irrelevance(category):
        return tuple(entries), None
    answers = utils.load_file(cfg.POSSIBLE_ANSWER_PATH / name, sort_by_id=True)
    if [a["id"] for a in answers] != [e["id"] for e in entries]:
        raise RuntimeError(f"bfcl-eval {category}: ground truth ids differ from the entries'")
    return tuple(entries), tuple(answers)


def unique_ids(entries: list[dict]) -> list[dict]:
    """``entries`` with the k-th repeat of an id renamed ``<id>#k``: bfcl-eval 2025.6.15's live_relevance has two
    different entries named ``live_relevance_3-3-0`` (the leaderboard counts both); item ids must be unique."""
    seen: dict[str, int] = {}
    out = []
    for e in entries:
        k = seen.get(e["id"], 0)
        seen[e["id"]] = k + 1
        out.append({**e, "id": f"{e['id']}#{k}"} if k else e)
    return out


CHAT_MARKUP = re.compile(r"<\|[A-Za-z0-9_]+\|>")  # special tokens a prompt format writes, e.g. <|eot_id|>


def first_prompt(handler: Any, entry: dict) -> str:
    """The first prompt bfcl-eval's ``handler`` sends for ``entry`` (as its single- and multi-turn loops build
    it; the entry is copied, not changed)."""
    e = copy.deepcopy(entry)
    data = handler._pre_query_processing_prompting(e)
    data = handler.add_first_turn_message_prompting(data, e["question"][0])
    return handler._format_prompt(data["message"], data["function"])


def purge_state(model_name: str) -> int:
    """Delete the multi-turn API instances bfcl-eval keeps for ``model_name`` (its inference, checker and
    ground-truth runs alike); returns how many were deleted."""
    utils = bfcl_sdk.load().multi_turn_utils
    prefix = model_name.replace("-", "_").replace(".", "_").replace("/", "_") + "_"
    names = [k for k in vars(utils) if k.startswith(prefix) and k.endswith("_instance")]
    for k in names:
        delattr(utils, k)
    return len(names)


def new_model_name() -> str:
    """A model name no other evaluation in any process uses (bfcl-eval keys its multi-turn state by it)."""
    return f"soce_bfcl_{os.getpid()}_{next(_RUNS)}_{uuid.uuid4().hex[:8]}"


def check_category(
    category: str,
    entries: list[dict],
    answers: list[dict] | None,
    results: dict[str, Any],
    handler: Any,
    names: tuple[str, str],
    score_dir: Path,
) -> list[float]:
    """0/1 per entry (in ``entries``' order) from bfcl-eval's runner for ``category``; ``names`` are (the
    evaluation's unique model name, a registered model name of the prompt format), ``score_dir`` scratch."""
    bfcl = bfcl_sdk.load()
    runner, utils = bfcl.eval_runner, bfcl.utils
    model_result = [{"id": e["id"], "result": results[e["id"]]} for e in entries]
    prompt = [dict(e) for e in entries]  # the multi-turn runner deletes each prompt's "function"
    if utils.is_relevance_or_irrelevance(category):
        name = names[1].replace("/", "_")
        runner.relevance_file_runner(handler, model_result, prompt, name, category, score_dir)
    elif utils.is_multi_turn(category):
        name = names[0]
        runner.multi_turn_runner(handler, model_result, prompt, list(answers), name, category, score_dir)
    else:
        name = names[1].replace("/", "_")
        # as bfcl-eval's evaluate_task decides it ("javascript" contains "java": is_js wins)
        language = "JavaScript" if utils.is_js(category) else "Java" if utils.is_java(category) else "Python"
        runner.ast_file_runner(handler, model_result, prompt, list(answers), language, category, name, score_dir)
    lines = utils.load_file(score_dir / name / f"{bfcl.category_mapping.VERSION_PREFIX}_{category}_score.json")
    failed = {row["id"] for row in lines[1:]}
    samples = [0.0 if e["id"] in failed else 1.0 for e in entries]
    if lines[0]["correct_count"] != sum(samples):
        raise RuntimeError(
            f"bfcl-eval {category}: {lines[0]['correct_count']} correct, but "
            f"{len(entries) - len(failed)} entries not listed as failed"
        )
    return samples


@dataclass
class Evaluator:
    """Scores live models on BFCL v3 in process (the :mod:`soce.benchmarks` contract)."""

    benchmark: BenchmarkConfig
    device: str = "cpu"
    handler: str = field(init=False)
    settings: GenSettings = field(init=False)
    _engines: dict[int, Any] = field(default_factory=dict, init=False, repr=False)  # id(model) -> Engine

    def __post_init__(self) -> None:
        check_config(self.benchmark)
        self.handler, self.settings = options(self.benchmark)
        bfcl_sdk.load()
        log.info(
            "BFCL v3 (bfcl-eval %s): handler %s (%s), %s, batch %d; vendor SDKs stood in for: %s",
            bfcl_sdk.BFCL_VERSION,
            self.handler,
            HANDLERS[self.handler][1],
            self.settings,
            self.benchmark.batch_size,
            ", ".join(sorted({n.split(".")[0] for n in bfcl_sdk.STAND_INS})) or "none",
        )

    def fingerprint(self) -> str:
        """Hash of the package version, categories, handler, holdout, generation settings and data files."""
        b, h = self.benchmark, self.benchmark.holdout
        settings = {
            "bfcl_eval": bfcl_sdk.BFCL_VERSION,
            "categories": sorted(b.categories),
            "handler": self.handler,
            "generation": dataclasses.asdict(self.settings),
            "limit": b.limit,
            "batch_size": b.batch_size,
            "holdout": [h.split, h.select_fraction, h.seed, b.select_split] if h.split else None,
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        bfcl = bfcl_sdk.load()
        for c in sorted(b.categories):
            name = bfcl.category_mapping.TEST_FILE_MAPPING[c]
            for path in (bfcl.eval_config.PROMPT_PATH / name, bfcl.eval_config.POSSIBLE_ANSWER_PATH / name):
                if path.is_file():
                    digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        return digest.hexdigest()[:16]

    def item_ids(self, split: str) -> dict[str, list[str]]:
        """Entry ids per category of ``split`` (``benchmark.limit`` first ones; carved half when a holdout is
        set: BFCL has one split, any split name reads it when none is)."""
        from soce.benchmarks.holdout import carve, side

        b = self.benchmark
        ids = {c: [e["id"] for e in load_category(c)[0]][: b.limit] for c in b.categories}
        if not b.holdout.split:
            return ids
        try:
            half = side(b.select_split, b.report_split, split)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return carve(ids, b.holdout.select_fraction, b.holdout.seed)[half]

    def demands(self, splits: list[str]) -> list[Any]:
        """What the entries of ``splits`` ask of a model (:mod:`soce.benchmarks.fitness`), per category: the
        longest first-turn prompts as the handler formats them (the entries longest in JSON are formatted),
        ``max_new_tokens``, and the chat markup (``<|...|>``) the format writes."""
        from soce.benchmarks.fitness import LONGEST, Demand, longest

        handler = self._handler_class()(HANDLERS[self.handler][2], 0.0)
        fix = f"another benchmark.options.handler ({' | '.join(HANDLERS)}) that writes the models' chat format"
        out = []
        for c in self.benchmark.categories:
            ids = {i for s in splits for i in self.item_ids(s).get(c, [])}
            entries = sorted((e for e in load_category(c)[0] if e["id"] in ids), key=lambda e: -len(json.dumps(e)))
            prompts = [first_prompt(handler, e) for e in entries[: 2 * LONGEST]]
            markup = tuple(sorted({m for p in prompts for m in CHAT_MARKUP.findall(p)}))
            out.append(Demand(c, longest(prompts), self.settings.max_new_tokens, markup, fix))
        return out

    def chosen(self, split: str, items: dict[str, list[str]] | None) -> dict[str, list[str]]:
        """The ids to evaluate per category: the split's, or ``items`` (each checked to be in the split);
        categories with none are left out."""
        allowed = self.item_ids(split)
        if items is None:
            return {c: ids for c, ids in allowed.items() if ids}
        out = {}
        for c, ids in items.items():
            known = set(allowed.get(c, ()))
            bad = [i for i in ids if str(i) not in known]
            if bad:
                raise ValueError(f"item {bad[0]!r} of category {c!r} is not in split {split!r}")
            wanted = {str(i) for i in ids}
            out[c] = [i for i in allowed[c] if i in wanted]
        return {c: ids for c, ids in out.items() if ids}

    def score(self, model: Any, tokenizer: Any, split: str, items: dict[str, list[str]] | None = None) -> dict:
        """Scores of the live ``model`` on ``split`` (all categories, or ``items``). The engine (KV pool, compiled
        decode step) is built once per model object and reused: a re-mixed model is the same object."""
        generate = engine_generator(model, tokenizer, self.settings, self._engines.get(id(model)))
        if hasattr(generate, "engine"):
            self._engines = {id(model): generate.engine}
        return self.score_with(generate, split, items)

    def score_with(self, generate: Generate, split: str, items: dict[str, list[str]] | None = None) -> dict:
        """Scores with ``generate`` (prompts -> completions) in the model's place; see the module doc."""
        chosen = self.chosen(split, items)
        kind = self._handler_class()
        name = new_model_name()
        try:
            picked = {c: [e for e in load_category(c)[0] if e["id"] in set(ids)] for c, ids in chosen.items()}
            todo = [copy.deepcopy(e) for c in chosen for e in picked[c]]
            todo.sort(key=lambda e: -len(json.dumps(e)))  # longest first: similar lengths batch together
            results = run_entries(kind, name, todo, generate, self.benchmark.batch_size)
            samples = self._check(kind, name, picked, results)
        finally:
            purge_state(name)
        return self._scores(samples, {c: [e["id"] for e in picked[c]] for c in chosen})

    def _handler_class(self) -> type:
        module, cls, _ = HANDLERS[self.handler]
        return getattr(getattr(bfcl_sdk.load(), module), cls)

    def _check(
        self, kind: type, name: str, picked: dict[str, list[dict]], results: dict[str, Any]
    ) -> dict[str, list[float]]:
        checker = kind(name, 0.0)
        names = (name, HANDLERS[self.handler][2])
        out = {}
        with tempfile.TemporaryDirectory(dir=bfcl_sdk.project_root(), prefix="score-") as tmp:
            for c, entries in picked.items():
                answers = load_category(c)[1]
                if answers is not None:
                    wanted = {e["id"] for e in entries}
                    answers = [a for a in answers if a["id"] in wanted]
                out[c] = check_category(c, entries, answers, results, checker, names, Path(tmp))
        return out

    def _scores(self, samples: dict[str, list[float]], ids: dict[str, list[str]]) -> dict[str, Any]:
        cats = [c for c in self.benchmark.categories if c in samples]
        out: dict[str, Any] = {c: _mean(samples[c]) for c in cats}
        if len(cats) == len(self.benchmark.categories):
            out["overall_mean"] = _mean([out[c] for c in cats])
            if set(cats) == set(CATEGORIES):
                out["overall_official"] = official_overall(out, {c: len(samples[c]) for c in cats})
            out["overall"] = out[f"overall_{self.benchmark.objective}"]
        out["samples"] = {c: samples[c] for c in cats}
        out["item_ids"] = {c: ids[c] for c in cats}
        return out


@backend("bfcl", install_hint=bfcl_sdk.INSTALL_HINT)
def make_bfcl(benchmark: BenchmarkConfig, device: str) -> Evaluator:
    """The BFCL v3 backend (bfcl-eval 2025.6.15, ``make bfcl``)."""
    return Evaluator(benchmark, device)
