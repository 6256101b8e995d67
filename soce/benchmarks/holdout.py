"""Held-out items carved out of one split: disjoint selection and report sets, per category.

Benchmarks that ship one split (MGSM in lm-eval, BFCL) would otherwise select experts and weights on the
items they report. ``carve`` ranks each category's items by a hash of (seed, category, item id) and gives
the first ``round(select_fraction * n)`` to selection, the rest to report: deterministic, independent
of the items' order on disk, stratified per category, and stable when items are added (an item keeps
its side unless the fraction's cut moves past it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence


def _rank(seed: int, category: str, item_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{category}\0{item_id}".encode()).hexdigest()


def carve(
    item_ids: Mapping[str, Sequence[str]], select_fraction: float, seed: int = 0
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(selection ids, report ids) per category, each list in the input's order.

    Every category with at least two items gets at least one item on each side."""
    if not 0 < select_fraction < 1:
        raise ValueError(f"benchmark.holdout.select_fraction must be in (0, 1), got {select_fraction}")
    select: dict[str, list[str]] = {}
    report: dict[str, list[str]] = {}
    for cat, ids in item_ids.items():
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"category {cat!r}: duplicate item ids")
        n = len(ids)
        k = min(max(round(select_fraction * n), 1), n - 1) if n >= 2 else n
        chosen = set(sorted(ids, key=lambda i: _rank(seed, cat, i))[:k])
        select[cat] = [i for i in ids if i in chosen]
        report[cat] = [i for i in ids if i not in chosen]
    return select, report


def side(benchmark_select_split: str, benchmark_report_split: str, split: str) -> int:
    """0 for the selection half, 1 for the report half of a carved split (by the benchmark's split names)."""
    if split == benchmark_select_split:
        return 0
    if split == benchmark_report_split:
        return 1
    raise ValueError(
        f"split {split!r} is neither select_split {benchmark_select_split!r} "
        f"nor report_split {benchmark_report_split!r}"
    )
