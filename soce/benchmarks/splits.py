"""Held-out means disjoint items: the selection and report splits are compared item by item before any
evaluation.

Benchmarks that ship one split (MGSM in lm-eval, BFCL, many users' own) resolve ``select_split`` and
``report_split`` to the same items; selecting experts and weights on them and calling the result held
out would be wrong and silent. :func:`check_splits` compares the items behind the two splits per category
(by content where the backend gives it: :meth:`item_keys`, else by item id) and decides:

- disjoint: the splits are used as they are;
- overlapping, no ``benchmark.holdout``: disjoint halves are carved out of the report split
  (:mod:`soce.benchmarks.holdout`: seeded, stratified per category), with one warning line; under
  ``benchmark.strict_splits=true`` the job is refused in one line instead;
- ``select_split == report_split``: the paper's protocol, kept as asked (warned by the job);
- ``benchmark.holdout`` set: halves carved as configured.

The :class:`SplitCheck` says which items were used; it goes to ``result.json`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from soce.config import BenchmarkConfig, ConfigError, HoldoutConfig

log = logging.getLogger(__name__)

MODES = ("disjoint", "carved", "holdout", "same_split")


@dataclass
class SplitCheck:
    """Which items a job selects on and reports on, per category (counts of items)."""

    mode: str  # one of MODES
    select_split: str
    report_split: str
    select: dict[str, int] = field(default_factory=dict)  # items used for selection, per category
    report: dict[str, int] = field(default_factory=dict)  # items reported, per category
    shared: dict[str, int] = field(default_factory=dict)  # items the two splits had in common before carving
    source: str | None = None  # carved modes: the data split both halves come from

    def statement(self) -> str:
        """One line saying which items were used (report.md, result.json)."""
        n_sel, n_rep = sum(self.select.values()), sum(self.report.values())
        if self.mode == "same_split":
            return (
                f"selected and reported on the same {n_rep} items of `{self.report_split}` (the paper's "
                "protocol): the gains are optimistic"
            )
        if self.mode == "disjoint":
            return (
                f"selected on {n_sel} items of `{self.select_split}`, reported on {n_rep} other items of "
                f"`{self.report_split}` (no item in both)"
            )
        why = (
            f"the splits `{self.select_split}` and `{self.report_split}` shared {sum(self.shared.values())} "
            "items, so soce carved them"
            if self.mode == "carved"
            else "benchmark.holdout"
        )
        return (
            f"selected on {n_sel} items and reported on {n_rep} other items, disjoint halves of `{self.source}` ({why})"
        )

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "statement": self.statement()}


def item_keys(evaluator: Any, split: str) -> dict[str, list[str]]:
    """What identifies each item of ``split`` per category: its content where the backend says
    (``evaluator.item_keys``), else its id."""
    keys = getattr(evaluator, "item_keys", None)
    return keys(split) if keys is not None else evaluator.item_ids(split)


def check_splits(benchmark: BenchmarkConfig, evaluator: Any) -> tuple[BenchmarkConfig, SplitCheck]:
    """(the benchmark to run, which items it uses): carved halves when the splits overlap and nothing else
    was asked; ConfigError (one line) for overlapping splits under ``strict_splits``. ``evaluator`` (of
    ``benchmark``) is pointed at the carved benchmark when it carves."""
    b = benchmark
    sel_name, rep_name = b.select_split, b.report_split
    if sel_name == rep_name:
        n = _counts(evaluator.item_ids(rep_name))
        return b, SplitCheck("same_split", sel_name, rep_name, n, n, n, rep_name)
    if b.holdout.split:
        return b, _carved_check("holdout", b, evaluator, {})
    sel, rep = item_keys(evaluator, sel_name), item_keys(evaluator, rep_name)
    shared = {c: len(set(sel[c]) & set(rep[c])) for c in b.categories}
    if not any(shared.values()):
        return b, SplitCheck("disjoint", sel_name, rep_name, _counts(sel), _counts(rep), shared)
    worst = max(b.categories, key=lambda c: shared[c])
    what = (
        f"benchmark {b.name!r}: select_split {sel_name!r} and report_split {rep_name!r} share "
        f"{sum(shared.values())} items ({shared[worst]} of {len(rep[worst])} in category {worst!r})"
    )
    if b.strict_splits:
        raise ConfigError(
            f"{what}; held-out scores need disjoint items: set benchmark.holdout.split={rep_name} to "
            f"carve halves, point the splits at disjoint data, or set benchmark.strict_splits=false"
        )
    carved = dataclasses.replace(b, holdout=HoldoutConfig(split=b.source_split(rep_name)))
    log.warning(
        "%s: carving disjoint halves of %r instead (benchmark.holdout, select_fraction %.2f, seed %d; "
        "benchmark.strict_splits=true refuses instead)",
        what,
        carved.holdout.split,
        carved.holdout.select_fraction,
        carved.holdout.seed,
    )
    evaluator.benchmark = carved
    return carved, _carved_check("carved", carved, evaluator, shared)


def _carved_check(mode: str, b: BenchmarkConfig, evaluator: Any, shared: dict[str, int]) -> SplitCheck:
    sel, rep = evaluator.item_ids(b.select_split), evaluator.item_ids(b.report_split)
    overlap = [c for c in b.categories if set(sel[c]) & set(rep[c])]
    if overlap:  # the carving is disjoint by construction; a backend that breaks it must not report
        raise RuntimeError(f"carved halves of {b.holdout.split!r} share items in category {overlap[0]!r}")
    return SplitCheck(mode, b.select_split, b.report_split, _counts(sel), _counts(rep), shared, b.holdout.split)


def _counts(ids: dict[str, list[str]]) -> dict[str, int]:
    return {c: len(v) for c, v in ids.items()}
