"""Item-level evaluation cache: per-item scores of one soup on one split, kept on disk item by item.

An evaluation of (soup, item subset) is stored per item, so growing a subset only evaluates the new items,
and a resumed or repeated search evaluates nothing twice. Layout: one append-only JSONL file per key,
``<root>/<key[:2]>/<key>.jsonl``; each line is one batch ``{"scores": {category: {item_id: score}}}``,
written with a single ``write`` under an exclusive lock and ``fsync``-ed before ``get_or_compute`` returns.
A process killed mid-write (``kill -9``) leaves at most a torn last line, which readers skip: the batch is
simply evaluated again. Several processes may share a root (the lock serialises appends).

``key`` identifies the soup and everything else that changes a score (checkpoint fingerprints, normalised
weights, benchmark fingerprint, split, settings): build it with :meth:`soce.benchmarks.scores.ScoreCache.key`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ItemScores = dict[str, dict[str, float]]  # {category: {item_id: score}}
Compute = Callable[[dict[str, list[str]]], ItemScores]


class ItemCache:
    """Per-item scores on disk, keyed by soup (see the module docstring); counters are in items."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.items_evaluated = 0  # items passed to ``compute`` by this object
        self.items_cached = 0  # items served from disk (or from this object's memory of it)
        self._memo: dict[str, ItemScores] = {}

    def path(self, key: str) -> Path:
        """The JSONL file of ``key``."""
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"item cache key {key!r} is not a plain file name")
        return self.root / key[:2] / f"{key}.jsonl"

    def load(self, key: str) -> ItemScores:
        """Everything cached under ``key`` ({} if nothing); torn or corrupt lines are skipped."""
        if key in self._memo:
            return self._memo[key]
        out: ItemScores = {}
        path = self.path(key)
        if path.exists():
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                try:
                    batch = json.loads(line)["scores"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s: line %d unreadable (torn write?): its items are evaluated again", path, n)
                    continue
                for cat, scores in batch.items():
                    out.setdefault(cat, {}).update({str(i): float(s) for i, s in scores.items()})
        self._memo[key] = out
        return out

    def get_or_compute(self, key: str, items: dict[str, list[str]], compute: Compute) -> ItemScores:
        """``{category: {item_id: score}}`` for every wanted item; ``compute(missing)`` is called once with only
        the items not cached under ``key`` (skipped when none) and must return a score for each of them."""
        have = self.load(key)
        wanted = {c: list(dict.fromkeys(str(i) for i in ids)) for c, ids in items.items()}
        missing = {c: [i for i in ids if i not in have.get(c, {})] for c, ids in wanted.items()}
        missing = {c: ids for c, ids in missing.items() if ids}
        n_missing = sum(len(ids) for ids in missing.values())
        self.items_cached += sum(len(ids) for ids in wanted.values()) - n_missing
        if missing:
            got = compute(missing)
            batch = {c: {i: _score(got, c, i) for i in ids} for c, ids in missing.items()}
            self._append(key, batch)
            for c, scores in batch.items():
                have.setdefault(c, {}).update(scores)
            self.items_evaluated += n_missing
        return {c: {i: have[c][i] for i in ids} for c, ids in wanted.items()}

    def _append(self, key: str, batch: ItemScores) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"scores": batch}, separators=(",", ":")) + "\n").encode()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _terminate_torn_line(fd)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock


def _terminate_torn_line(fd: int) -> None:
    """If a killed writer left a line without its newline, end it, so the next batch starts a line of its own."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")


def _score(got: ItemScores, category: str, item: str) -> float:
    try:
        return float(got[category][item])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"item evaluation returned no score for item {item!r} of category {category!r}") from None
