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
    ``overall`` a finite number and, with ``categories``, their mean (or the backend's ``overall_official``);
    ``samples`` a dict of lists of finite numbers; ``item_ids`` a dict of lists."""
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
    return _overall_problem(value, categories) if categories else None


def _overall_problem(value: dict[str, Any], categories: list[str]) -> str | None:
    """``overall`` must be the categories' mean (or the entry's ``overall_official``, for backends that
    score an official formula); ``overall_mean``, when present, must be that mean."""
    mean = sum(value[c] for c in categories) / len(categories)
    if "overall_mean" in value and not math.isclose(value["overall_mean"], mean, abs_tol=1e-6):
        return f"overall_mean = {value['overall_mean']!r} is not its categories' mean ({mean:.6g})"
    allowed = [mean, *([value["overall_official"]] if _number(value.get("overall_official")) else [])]
    if not any(math.isclose(value["overall"], a, abs_tol=1e-6) for a in allowed):
        return f"overall = {value['overall']!r} is not its categories' mean ({mean:.6g})"
    return None


@dataclass
class ScoreCache:
    """On-disk cache of evaluations: one JSON file per key, written atomically (safe across processes).
    Entries are checked against the evaluation schema (:func:`entry_problem`) when read: a bad one (wrong
    type, a score outside [0, 1], a category missing, an overall that is not its categories' mean) is evaluated
    again, with a warning."""

    root: Path
    evaluated: int = 0  # evaluations actually run through this cache object
    cached: int = 0  # evaluations served from disk
    rejected: int = 0  # entries on disk that failed the schema and were evaluated again

    def key(self, weights: Mapping[str, float], fingerprints: Mapping[str, str], context: Mapping[str, Any]) -> str:
        total = sum(weights.values())
        mix = sorted((fingerprints[m], round(w / total, 9)) for m, w in weights.items() if w > 0)
        blob = json.dumps({"mix": mix, **context}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get_or_compute(
        self, key: str, compute: Callable[[], dict[str, Any]], categories: list[str] | None = None
    ) -> dict[str, Any]:
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


SCALES = ("percent", "fraction")  # the units a score table may be stated in (pool.scale)


def read_score_csv(
    path: str | Path, categories: list[str] | None = None, scale: str | None = None
) -> tuple[pd.DataFrame, dict[str, str]]:
    """(scores, paths) from a CSV: first column = model name, then one numeric column per category,
    optional ``path`` column. Scores come back as fractions in [0, 1].

    One unit per table. ``scale=None`` (auto): the table is in fractions when every cell is <= 1 and none
    ends in ``%``, else in percent, and then a low cell (0.5) is a low score (0.5%), not a fraction; a
    column whose every cell is <= 1 (none marked ``%``) in a percent table is refused, naming it: it is
    either in another unit or needs the unit stated. ``scale="percent"|"fraction"``: the stated unit (a
    fraction table with a cell > 1 or a ``%`` is refused). One clear error (naming model and category) per
    problem: duplicate models, missing, non-numeric, NaN/inf, negative or > 100 cells, missing categories."""
    if scale not in (None, *SCALES):
        raise ConfigError(f"score table scale must be percent, fraction or null (auto), got {scale!r}")
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
        raise ConfigError(f"{path}: no column for category {missing[0]!r} (it has: {', '.join(raw.columns)})")
    cells = {c: _parse_column(path, c, raw[c]) for c in raw.columns}
    unit = scale or _table_unit(path, cells)
    over = next(((c, cell) for c, col in cells.items() for cell in col if cell[3] or cell[2] > 1), None)
    if unit == "fraction" and over is not None:
        raise ConfigError(f"{path}: pool.scale=fraction but model {over[1][0]!r} has {over[1][1]} in {over[0]!r}")
    table = pd.DataFrame(
        {c: [v / 100 if unit == "percent" else v for _, _, v, _ in cells[c]] for c in cats},
        index=raw.index,
        dtype=float,
    )
    table.index.name = "model"
    return table, paths


Cell = tuple[str, str, float, bool]  # (model, cell text, value, marked with %)


def _parse_column(path: str | Path, category: str, cells: pd.Series) -> list[Cell]:
    """One CSV column's cells as numbers in [0, 100]; one line naming model and category per bad cell."""
    parsed: list[Cell] = []
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
        parsed.append((str(m), cell, v, cell.endswith("%")))
    return parsed


def _table_unit(path: str | Path, cells: dict[str, list[Cell]]) -> str:
    """``fraction`` when no cell of the table is > 1 or marked ``%``, else ``percent``; in a percent table a
    column with no such cell is refused (its unit is not the table's, or must be stated)."""

    def percent_cell(col: list[Cell]) -> Cell | None:
        return next((c for c in col if c[3] or c[2] > 1), None)

    witness = next(((cat, hit) for cat, col in cells.items() if (hit := percent_cell(col))), None)
    if witness is None:
        return "fraction"
    for cat, col in cells.items():
        if percent_cell(col) is None:
            lo, hi = min(v for _, _, v, _ in col), max(v for _, _, v, _ in col)
            raise ConfigError(
                f"{path}: column {cat!r} holds only values <= 1 ({lo:g} to {hi:g}) but the table is in percent "
                f"(model {witness[1][0]!r} has {witness[1][1]} in {witness[0]!r}): one unit per table; state it "
                f"with pool.scale=percent if {cat!r} is in percent too, else convert the file"
            )
    return "percent"


def with_population_csv(
    population: pd.DataFrame, path: str | None, categories: list[str], scale: str | None = None
) -> pd.DataFrame:
    """``population`` plus the models of the score table at ``path`` (selection.population_csv) it lacks;
    ``scale``: the table's stated unit (pool.scale), None: auto (:func:`read_score_csv`)."""
    if not path:
        return population
    extra = read_score_csv(path, categories, scale)[0]
    return pd.concat([population, extra.loc[~extra.index.isin(population.index)]])
