"""Score tables and the evaluation cache.

A score table is a DataFrame: rows = models, columns = categories (+ ``overall``), values in [0, 1].
Every evaluation is cached on disk, keyed by what determines its result: the fingerprints of the
checkpoints and their normalised weights (a single model is weight 1), the benchmark's fingerprint,
the split, the evaluation settings and the lm-eval version. Candidate scores are therefore computed
once per (model, benchmark) and reused by every job of a sweep, by later runs and by resumed runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from soce.config import ConfigError
from soce.files import write_json_atomic

_FULL_HASH_LIMIT = 256 * 2**20  # below this total size, hash the files' bytes together (the original formula)
_FINGERPRINTED = {".safetensors", ".bin", ".json", ".model", ".txt", ".jinja"}  # weights, config, tokenizer
_RACY_NS = 10**9  # a file changed this recently may change again within one timestamp tick: not memoised
log = logging.getLogger(__name__)


@dataclass
class HashStats:
    """What :func:`model_fingerprint` did in this process (for tests and progress messages)."""

    hashed_bytes: int = 0  # bytes read and hashed
    memo_hits: int = 0  # large files whose digest came from the memo


HASH_STATS = HashStats()


def model_fingerprint(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """Content fingerprint of a checkpoint (dir or file): any changed byte of its weights, config or tokenizer
    files (``.safetensors .bin .json .model .txt .jinja``) changes it. Hub ids fingerprint as their name.

    Up to 256 MiB in all, the files are hashed together on every call (cheap). Larger checkpoints: each file's
    full sha256 (see :func:`file_digest`), memoised in ``memo_dir`` when given (e.g. ``<cache_dir>/fingerprints``)
    so that a 16 GB checkpoint is read once per change, not once per run."""
    p = Path(path)
    if not p.exists():
        return "hub:" + str(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in _FINGERPRINTED and f.is_file())
    sizes = {f: f.stat().st_size for f in files}
    h = hashlib.sha256()
    small = sum(sizes.values()) <= _FULL_HASH_LIMIT
    for f in files:
        h.update(f.name.encode())
        h.update(str(sizes[f]).encode())
        if small:
            h.update(f.read_bytes())
            HASH_STATS.hashed_bytes += sizes[f]
        else:
            h.update(file_digest(f, memo_dir).encode())
    return h.hexdigest()[:20]


def file_digest(file: Path, memo_dir: str | Path | None = None) -> str:
    """sha256 (hex) of a file's bytes, streamed. Memoised in ``memo_dir`` under the file's identity: resolved
    path, device, inode, size, mtime_ns and ctime_ns (ctime cannot be set back, so an in-place rewrite that
    restores the mtime is still seen). Not memoised when the file changed during hashing or less than a
    second before it (one timestamp tick may hide a second write)."""
    st = file.stat()
    ident = [str(file.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    memo = None
    if memo_dir is not None:
        memo = Path(memo_dir) / f"{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]}.json"
        try:
            rec = json.loads(memo.read_text())
        except (OSError, ValueError):
            rec = None
        if isinstance(rec, dict) and rec.get("file") == ident and isinstance(rec.get("sha256"), str):
            HASH_STATS.memo_hits += 1
            return rec["sha256"]
    started = time.time_ns()
    with open(file, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    HASH_STATS.hashed_bytes += st.st_size
    after = file.stat()
    stable = (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo is not None and stable and started - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        write_json_atomic(memo, {"file": ident, "sha256": digest})
    return digest


RESERVED = ("overall", "samples", "item_ids")  # keys of an evaluation that are not category scores


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def entry_problem(value: Any, categories: list[str] | None = None) -> str | None:
    """None when ``value`` is a valid evaluation (the Evaluator contract in :mod:`soce.benchmarks`), else
    the first problem, one line. Schema: a dict; every category in ``categories`` present (and then
    ``overall`` too); every key but ``overall``/``samples``/``item_ids`` a finite number in [0, 1];
    ``overall`` a finite number; ``samples`` a dict of lists of finite numbers; ``item_ids`` a dict of lists."""
    if not isinstance(value, dict):
        return f"a {type(value).__name__}, not a dict of scores"
    need = [*(categories or []), *(["overall"] if categories else [])]
    missing = [c for c in need if c not in value]
    if missing:
        return f"no score for {missing[0]!r}"
    for k, v in value.items():
        if k not in RESERVED and not (_number(v) and 0 <= v <= 1):
            return f"score {k!r} = {v!r} is not a number in [0, 1]"
    if "overall" in value and not _number(value["overall"]):
        return f"overall = {value['overall']!r} is not a finite number"
    for k in ("samples", "item_ids"):
        got = value.get(k, {})
        if not isinstance(got, dict) or not all(isinstance(x, list) for x in got.values()):
            return f"{k} is not a dict of lists"
    if not all(_number(x) for xs in value.get("samples", {}).values() for x in xs):
        return "samples holds a value that is not a finite number"
    return None


@dataclass
class ScoreCache:
    """On-disk cache of evaluations: one JSON file per key, written atomically (safe across processes).
    Entries are checked against the evaluation schema (:func:`entry_problem`) when read: a bad one (wrong
    type, a score outside [0, 1], a category missing) is evaluated again, with a warning."""

    root: Path
    evaluated: int = 0  # evaluations actually run through this cache object
    cached: int = 0  # evaluations served from disk
    rejected: int = 0  # entries on disk that failed the schema and were evaluated again

    def key(self, weights: Mapping[str, float], fingerprints: Mapping[str, str], context: Mapping[str, Any]) -> str:
        total = sum(weights.values())
        mix = sorted((fingerprints[m], round(w / total, 9)) for m, w in weights.items() if w > 0)
        blob = json.dumps({"mix": mix, **context}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, Any]],
                       categories: list[str] | None = None) -> dict[str, Any]:
        """The cached evaluation for ``key``, else ``compute()`` (stored). ``categories``: those every entry
        must score (pass the benchmark's). A computed value that fails the schema raises ValueError."""
        path = Path(self.root) / key[:2] / f"{key}.json"
        if path.exists():
            try:
                value = json.loads(path.read_text())
                problem = entry_problem(value, categories)
            except (OSError, ValueError) as e:  # a torn write cannot happen (atomic), but a corrupt file can
                problem = f"unreadable ({' '.join(str(e).split())})"
            if problem is None:
                self.cached += 1
                return value
            self.rejected += 1
            log.warning("score cache entry %s is invalid (%s): evaluating again", path, problem)
        value = compute()
        problem = entry_problem(value, categories)
        if problem is not None:
            raise ValueError(f"evaluation for cache key {key} is invalid ({problem}); not cached")
        self.evaluated += 1
        write_json_atomic(path, value)
        return value


def score_table(results: Mapping[str, Mapping[str, float]], categories: list[str]) -> pd.DataFrame:
    """Rows = models, columns = categories + overall, from {model: {category: score}}."""
    table = pd.DataFrame.from_dict({m: dict(r) for m, r in results.items()}, orient="index")
    missing = [c for c in categories if c not in table.columns]
    if missing:
        raise ValueError(f"score table has no column for category {missing[0]!r}")
    table = table[categories].astype(float)
    table["overall"] = table[categories].mean(axis=1)
    table.index.name = "model"
    return table


def read_score_csv(path: str | Path, categories: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """(scores, paths) from a CSV: first column = model name, then one numeric column per category,
    optional ``path`` column. Scores come back as fractions in [0, 1].

    Scale, decided per column: a column is in percent when one of its cells ends in ``%`` or exceeds 1;
    it is then divided by 100, and a bare cell in (0, 1] in it is refused as a mixed scale (write ``0.5%``
    for half a percent); otherwise it is in fractions. One clear error (naming model and category) per
    problem: duplicate models, missing, non-numeric, NaN/inf, negative or > 100 cells, mixed scales, missing
    categories."""
    try:
        raw = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - pandas raises many types; the user needs one line
        raise ConfigError(f"{path}: cannot read as CSV ({str(e).splitlines()[0]})") from None
    raw.index = raw.index.map(str).str.strip()
    if raw.empty:
        raise ConfigError(f"{path}: no rows")
    dup = raw.index[raw.index.duplicated()]
    if len(dup):
        raise ConfigError(f"{path}: model {dup[0]!r} appears twice")
    paths = {m: p for m, p in raw.pop("path").items() if p.strip()} if "path" in raw.columns else {}
    cats = categories or list(raw.columns)
    missing = [c for c in cats if c not in raw.columns]
    if missing:
        raise ConfigError(f"{path}: no column for category {missing[0]!r}")
    table = pd.DataFrame({c: _score_column(path, c, raw[c]) for c in cats}, index=raw.index, dtype=float)
    table.index.name = "model"
    return table, paths


def _score_column(path: str | Path, category: str, cells: pd.Series) -> list[float]:
    """One CSV column as fractions (the scale rule of :func:`read_score_csv`)."""
    parsed: list[tuple[str, str, float, bool]] = []  # (model, cell, value, marked with %)
    for m, text in cells.items():
        cell = text.strip()
        where = f"for model {m!r}, category {category!r}"
        if cell == "":
            raise ConfigError(f"{path}: missing score {where}")
        try:
            if "_" in cell:  # float() reads '0_5' as 5.0
                raise ValueError(cell)
            v = float(cell.removesuffix("%"))
        except ValueError:
            raise ConfigError(f"{path}: non-numeric score {cell!r} {where}") from None
        if not math.isfinite(v):
            raise ConfigError(f"{path}: non-finite score {cell!r} {where} (scores are numbers in [0, 1] or percent)")
        if v < 0 or v > 100:
            raise ConfigError(f"{path}: score {cell!r} {where} is out of range (scores in [0, 1] or in percent)")
        parsed.append((m, cell, v, cell.endswith("%")))
    pct = next(((m, c) for m, c, v, marked in parsed if marked or v > 1), None)
    if pct is None:
        return [v for _, _, v, _ in parsed]
    for m, cell, v, marked in parsed:
        if not marked and 0 < v <= 1:
            raise ConfigError(f"{path}: category {category!r} mixes scales: model {m!r} has {cell} (a fraction?)"
                              f" but model {pct[0]!r} has {pct[1]} (percent); use one scale per column"
                              f" (write {cell}% if it is a percentage)")
    return [v / 100 for _, _, v, _ in parsed]


def with_population_csv(population: pd.DataFrame, path: str | None, categories: list[str]) -> pd.DataFrame:
    """``population`` plus the models of the score table at ``path`` (selection.population_csv) it lacks."""
    if not path:
        return population
    extra = read_score_csv(path, categories)[0]
    return pd.concat([population, extra.loc[~extra.index.isin(population.index)]])
