"""Benchmark backends: an evaluator scores a live model, per category, on one split of a benchmark.

A backend is registered by name with :func:`backend`; ``benchmark.backend`` in the config picks it
(``lm_eval`` in :mod:`soce.benchmarks.lmeval`, ``bfcl`` in :mod:`soce.benchmarks.bfcl`). Its factory takes
the benchmark's typed config and a device and returns an :class:`Evaluator`.

The contract of ``Evaluator.score(model, tokenizer, split, items=None)`` (a :data:`Scores` dict):

* ``{category: score}`` for every category of the benchmark, each in [0, 1];
* ``"overall"``: the benchmark's objective over the categories (``benchmark.objective``; ``mean`` is the
  unweighted mean of categories, other objectives are the backend's, e.g. BFCL's official overall);
* ``"samples"``: ``{category: [per-item score]}``, items in a fixed order (by item id);
* ``"item_ids"``: ``{category: [item id]}`` in the same order, when the backend has ids.

``items`` (``{category: [item id]}``) restricts the evaluation to those items of the split (for searches
that race points on item subsets); category scores are then the means over those items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from soce.config import BenchmarkConfig

Scores = dict[str, Any]


class Evaluator(Protocol):
    """Scores live models on one benchmark (see the module docstring for the returned dict)."""

    benchmark: BenchmarkConfig

    def score(self, model: Any, tokenizer: Any, split: str, items: dict[str, list[str]] | None = None) -> Scores: ...

    def fingerprint(self) -> str:
        """Hash of everything that changes scores (task files, data, settings, package versions)."""
        ...


@dataclass(frozen=True)
class Backend:
    """A registered backend: its factory and what it needs beyond the base install (for error lines)."""

    name: str
    make: Callable[[BenchmarkConfig, str], Evaluator]
    install_hint: str = ""


BACKENDS: dict[str, Backend] = {}


def backend(name: str, install_hint: str = "") -> Callable:
    """Register ``make(benchmark, device) -> Evaluator`` as backend ``name``."""

    def register(make: Callable[[BenchmarkConfig, str], Evaluator]) -> Callable:
        BACKENDS[name] = Backend(name, make, install_hint)
        return make

    return register


KNOWN_BACKENDS = {"lm_eval": "soce.benchmarks.lmeval", "bfcl": "soce.benchmarks.bfcl"}  # name -> module


def get_backend(name: str) -> Backend:
    """The backend ``name``, importing its module on first use (so unused backends cost no import)."""
    if name not in BACKENDS and name in KNOWN_BACKENDS:
        import importlib

        importlib.import_module(KNOWN_BACKENDS[name])
    if name not in BACKENDS:
        raise KeyError(f"unknown benchmark.backend {name!r}; available: {', '.join(sorted(KNOWN_BACKENDS))}")
    return BACKENDS[name]


def make_evaluator(benchmark: BenchmarkConfig, device: str) -> Evaluator:
    """The evaluator of ``benchmark.backend`` for ``benchmark`` on ``device``."""
    return get_backend(benchmark.backend).make(benchmark, device)


def mean_objective(scores: dict[str, float], categories: list[str]) -> float:
    """The paper's objective: the unweighted mean over the categories."""
    return sum(scores[c] for c in categories) / len(categories)
