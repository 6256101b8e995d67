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
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from soce.config import ConfigError

_FULL_HASH_LIMIT = 256 * 2**20  # hash whole files below this total size, else headers + samples
_FINGERPRINTED = {".safetensors", ".bin", ".json", ".model", ".txt", ".jinja"}  # weights, config, tokenizer


def model_fingerprint(path: str | Path) -> str:
    """Content fingerprint of a checkpoint dir (weights, config). Hub ids fingerprint as their name.

    Files: weights, configs and tokenizer files (``.safetensors .bin .json .model .txt .jinja``). Small
    checkpoints (< 256 MiB in all) are hashed whole; large ones by file sizes and 1 MiB samples at the start
    (safetensors header: names, dtypes, shapes, offsets), middle and end of each file, so a large checkpoint
    rewritten in place with the same layout and sizes needs its cache entries removed (``outputs/cache``).
    """
    p = Path(path)
    if not p.exists():
        return "hub:" + str(path)
    files = sorted(f for f in p.iterdir() if f.suffix in _FINGERPRINTED and f.is_file())
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            if total <= _FULL_HASH_LIMIT:
                h.update(fh.read())
                continue
            for offset in (0, size // 2, max(0, size - 2**20)):
                fh.seek(offset)
                h.update(fh.read(2**20))
    return h.hexdigest()[:20]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary sibling and a rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class ScoreCache:
    """On-disk cache of evaluations: one JSON file per key, written atomically (safe across processes)."""

    root: Path
    evaluated: int = 0  # evaluations actually run through this cache object
    cached: int = 0  # evaluations served from disk

    def key(self, weights: Mapping[str, float], fingerprints: Mapping[str, str], context: Mapping[str, Any]) -> str:
        total = sum(weights.values())
        mix = sorted((fingerprints[m], round(w / total, 9)) for m, w in weights.items() if w > 0)
        blob = json.dumps({"mix": mix, **context}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = Path(self.root) / key[:2] / f"{key}.json"
        if path.exists():
            try:
                value = json.loads(path.read_text())
                self.cached += 1
                return value
            except json.JSONDecodeError:
                pass  # a torn write cannot happen (atomic), but a corrupted file is recomputed
        value = compute()
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
    optional ``path`` column. Scores in [0, 1] or in percent (> 1: divided by 100). One clear error per
    problem: duplicate models, missing or non-numeric cells, missing categories."""
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
    table = pd.DataFrame(index=raw.index, columns=cats, dtype=float)
    for m in raw.index:
        for c in cats:
            cell = raw.at[m, c].strip()
            if cell == "":
                raise ConfigError(f"{path}: missing score for model {m!r}, category {c!r}")
            try:
                table.at[m, c] = float(cell.rstrip("%"))
            except ValueError:
                raise ConfigError(f"{path}: non-numeric score {cell!r} for model {m!r}, category {c!r}") from None
    if (table.values > 1).any():
        table = table / 100.0
    table.index.name = "model"
    return table, paths


def with_population_csv(population: pd.DataFrame, path: str | None, categories: list[str]) -> pd.DataFrame:
    """``population`` plus the models of the score table at ``path`` (selection.population_csv) it lacks."""
    if not path:
        return population
    extra = read_score_csv(path, categories)[0]
    return pd.concat([population, extra.loc[~extra.index.isin(population.index)]])
