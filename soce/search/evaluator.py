"""The in-memory merge evaluator: score any soup of the candidates (or any checkpoint) on a benchmark split.

Soups are re-mixed into one live model held by a :class:`soce.soup.Remixer` (the experts stay resident;
nothing is written to disk), then scored by the benchmark's evaluator. Every evaluation goes through the
score cache first, keyed by the checkpoints' content fingerprints, the normalised weights, the benchmark
and the evaluation settings, so a repeated or resumed search evaluates nothing twice. Item-level
evaluations (``item_scores``) are cached per item.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soce.benchmarks import Evaluator, Scores
from soce.benchmarks.lmeval import lm_eval_version
from soce.benchmarks.scores import ScoreCache, model_fingerprint

CACHE_FORMAT = 2  # bump when the meaning of cached scores changes (old entries are then recomputed)


@dataclass
class SoupEvaluator:
    """Scores soups of ``candidates`` and single checkpoints of ``models`` (candidates + population).

    ``timings`` collects (re-mix seconds, evaluation seconds) per soup evaluated in memory."""

    models: dict[str, str]  # name -> checkpoint dir or hub id (every model that may be scored)
    candidates: list[str]  # the names that may be mixed (soup ingredients), in candidate order
    evaluator: Evaluator
    cache: ScoreCache
    device: str = "cpu"
    dtype: str | None = None
    item_cache: Any = None  # soce.search.items.ItemCache (per-item evaluations) or None
    allow_nonfinite: bool = False  # NaN/inf in a soup: evaluated (True) or refused with SoupError (False)
    timings: list[tuple[float, float]] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    device_map: Any = None  # {module prefix: device} or "auto": the live model sharded (soce.soup.Remixer)
    max_memory: Any = None  # transformers' max_memory with device_map="auto" ({gpu index: bytes, "cpu": bytes})
    expert_placement: str | None = None  # "auto" | "with_shard" | "host"; None: the single-device rule
    merge: dict[str, Any] = field(default_factory=dict)  # the merge operator and its parameters (default linear)
    base: str | None = None  # the candidates' base checkpoint (task-vector operators)
    _remixer: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.fingerprints:
            memo = Path(self.cache.root) / "fingerprints"  # full hashes of large checkpoints, once per change
            self.fingerprints = {name: model_fingerprint(path, memo_dir=memo) for name, path in self.models.items()}
        self.context = {
            "benchmark": self.evaluator.fingerprint(),
            "metric": self.evaluator.benchmark.metric,
            "dtype": self.dtype,
            "device": self.device.split(":")[0],
            "lm_eval": lm_eval_version(),
            "format": CACHE_FORMAT,
        }
        self.operator = _operator(self.merge)
        if self.operator is not None:  # soups of several ingredients differ by operator (and base)
            memo = Path(self.cache.root) / "fingerprints"
            self.merge_context = {"merge": self.operator, "base": model_fingerprint(self.base, memo_dir=memo)}

    def key(self, weights: dict[str, float], split: str) -> str:
        """The cache key of the soup ``weights`` (zero weights dropped) evaluated on ``split``; with a
        non-linear operator, soups of two or more ingredients also key on it and on the base (one ingredient
        is that checkpoint itself, whatever the operator)."""
        live = _live(weights)
        ctx = {**self.context, "split": split}
        if self.operator is not None and len(live) > 1:
            ctx.update(self.merge_context)
        return self.cache.key(live, self.fingerprints, ctx)

    def scores(self, weights: dict[str, float], split: str) -> Scores:
        """Scores of the soup ``weights`` ({name: weight}, any positive sum) on the whole ``split``."""
        live = _live(weights)
        return self.cache.get_or_compute(
            self.key(live, split),
            lambda: self._evaluate(live, split, None),
            categories=self.evaluator.benchmark.categories,
        )

    def item_scores(self, weights: dict[str, float], split: str, items: dict[str, list[str]]) -> Scores:
        """Per-item scores of the soup on ``items`` of ``split`` ({category: [item id]}), cached per item:
        ``{"samples": {category: [score]}, "item_ids": {category: [id]}, category: mean}``."""
        if self.item_cache is None:
            raise RuntimeError("item_scores needs an item cache (soce.search.items.ItemCache)")
        live = _live(weights)

        def compute(missing: dict[str, list[str]]) -> dict[str, dict[str, float]]:
            out = self._evaluate(live, split, missing)
            return {c: dict(zip(out["item_ids"][c], out["samples"][c], strict=True)) for c in out["item_ids"]}

        got = self.item_cache.get_or_compute(self.key(live, split), items, compute)
        ids = {c: [i for i in items[c]] for c in items if items[c]}
        samples = {c: [got[c][i] for i in ids[c]] for c in ids}
        return {**{c: sum(v) / len(v) for c, v in samples.items()}, "samples": samples, "item_ids": ids}

    def item_ids(self, split: str) -> dict[str, list[str]]:
        """Every item id of ``split`` per category (the benchmark's carving applied)."""
        return self.evaluator.item_ids(split)

    def _evaluate(self, live: dict[str, float], split: str, items: dict[str, list[str]] | None) -> Scores:
        """One real evaluation: a single checkpoint is loaded from disk, a soup re-mixed in memory."""
        if len(live) == 1 and ((name := next(iter(live))) not in self._resident() or self.operator is not None):
            from soce.benchmarks.lmeval import load_model

            model, tokenizer = load_model(self.models[name], self.device, self.dtype)
            return self.evaluator.score(model, tokenizer, split, items)
        t0 = time.perf_counter()
        rmx = self._remixer_for(live)
        model = rmx.mix(live, allow_nonfinite=self.allow_nonfinite)
        rmx.synchronize()  # every GPU of the live model
        t1 = time.perf_counter()
        scores = self.evaluator.score(model, self.tokenizer(), split, items)
        self.timings.append((t1 - t0, time.perf_counter() - t1))
        return scores

    def _resident(self) -> list[str]:
        return list(self._remixer.names) if self._remixer is not None else []

    def _remixer_for(self, live: dict[str, float]) -> Any:
        """The Remixer holding every ingredient of ``live``: the resident set grows, it never shrinks."""
        from soce.soup import Remixer

        unknown = [n for n in live if n not in self.candidates]
        if unknown:
            raise KeyError(f"{unknown[0]!r} is not a candidate: only candidates are mixed")
        resident = self._resident()
        if not set(live) <= set(resident):
            names = [n for n in self.candidates if n in live or n in resident]
            self._remixer = None  # free the old experts before loading the new set
            self._remixer = Remixer(
                {n: self.models[n] for n in names},
                dtype=self.dtype,
                device=None if self.device_map is not None else self.device,
                device_map=self.device_map,
                max_memory=self.max_memory,
                expert_placement=self.expert_placement,
                merge=self.merge or None,
                base=self.base,
            )
        return self._remixer

    def scores_many(
        self,
        points: list[dict[str, float]],
        split: str,
        workers: list[SoupEvaluator] | None = None,
        on_done: Any = None,
    ) -> list[Scores]:
        """:meth:`scores` of several soups, spread over ``workers`` (SoupEvaluators, one per GPU or GPU group:
        :func:`on_devices`) when given; results in point order, the same as the serial loop."""
        from functools import partial

        from soce.search import parallel

        return parallel.evaluate_points([partial(w.scores, split=split) for w in workers or [self]], points, on_done)

    def tokenizer(self) -> Any:
        """The ingredients share one base, hence one tokenizer: the first candidate's."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.models[self.candidates[0]])
        return self._tokenizer

    def timing_summary(self) -> dict[str, float]:
        """Median re-mix and evaluation seconds per soup evaluated in memory, and their ratio."""
        if not self.timings:
            return {}
        mix = sorted(t[0] for t in self.timings)
        ev = sorted(t[1] for t in self.timings)
        mid = len(self.timings) // 2
        return {
            "soups": len(self.timings),
            "mix_s_median": round(mix[mid], 5),
            "eval_s_median": round(ev[mid], 4),
            "mix_over_eval": round(mix[mid] / ev[mid], 5) if ev[mid] else float("nan"),
        }


def on_devices(
    base: SoupEvaluator, n_workers: int, make_evaluator: Any, gpus_per_worker: int = 1, n_gpus: int | None = None
) -> list[SoupEvaluator]:
    """``n_workers`` SoupEvaluators for a parallel search: one per GPU (or group of ``gpus_per_worker`` GPUs, the
    live model sharded over it; no GPU: all on ``base.device``), sharing ``base``'s models, caches and
    fingerprints, each with its own benchmark evaluator (``make_evaluator(device)``: threads must not share
    lm-eval's request copies) and its own Remixer. The first is ``base`` itself where it fits the first slot."""
    import dataclasses

    from soce.search import parallel

    if n_gpus is None:
        import torch

        n_gpus = torch.cuda.device_count()
    groups = parallel.device_groups(n_gpus, gpus_per_worker)[:n_workers] if n_gpus else [None] * n_workers
    out: list[SoupEvaluator] = []
    for group in groups:
        place = parallel.remixer_placement(group) if group else {"device": base.device}
        device = place.pop("device", None) or f"cuda:{group[0]}"
        same = device.removesuffix(":0") == base.device.removesuffix(":0")
        if not out and not place and same and base.device_map is None:
            out.append(base)
        else:
            out.append(
                dataclasses.replace(
                    base,
                    evaluator=make_evaluator(device),
                    device=device,
                    timings=[],
                    _remixer=None,
                    _tokenizer=None,
                    **place,
                )
            )
    return out


def _operator(merge: dict[str, Any]) -> dict[str, Any] | None:
    """The operator's resolved parameters (``MergeSpec.params``), or None for the linear soup."""
    if not merge or merge.get("method", "linear") == "linear":
        return None
    from soce.soup.operators import MergeSpec

    return MergeSpec.from_mapping(merge).params()


def _live(weights: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in weights.items() if v > 0}
