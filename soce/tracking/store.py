"""The MLflow store: its URI checked up front, created once under a file lock, valid keys for any name,
experiments, batched params and metrics. Everything goes through ``MlflowClient`` with explicit run ids
(no global active run), so the driver and the job processes of a sweep can each write to the same parent."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import socket
import time
import unicodedata
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_KEY = 250  # MLflow's limit on metric/param/tag key length
HTTP_RETRIES, HTTP_TIMEOUT_S = "2", "20"  # MLflow's HTTP retry settings for jobs (its defaults: 7, 120 s)
PREFLIGHT_TIMEOUT_S = 3.0
SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")  # checked by soce.job.preflight


# ---- keys: any model or category name becomes a valid MLflow key -----------------------------------------

_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_key(name: str, limit: int = MAX_KEY) -> str:
    """``name`` as an MLflow metric/param key: unchanged if valid (ASCII alphanumerics, ``_ - . space /``,
    at most ``limit`` characters, a normalised path); otherwise each other character becomes ``_`` and a
    6-hex hash of the real name is appended, so different names never share a key."""
    if name and not _BAD.search(name) and len(name) <= limit and posixpath.normpath(name) == name:
        return name
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode() or name
    safe = _BAD.sub("_", ascii_name)
    if posixpath.normpath(safe) != safe:
        safe = safe.replace("/", "_")
    digest = hashlib.sha1(name.encode()).hexdigest()[:6]
    return f"{safe[: limit - 7]}_{digest}"


def mlflow_keys(names: list[str]) -> dict[str, str]:
    """{name: key} for several names, keys distinct (a valid name equal to another's key is hashed too)."""
    keys = {n: mlflow_key(n) for n in names}
    seen: dict[str, str] = {}
    for n, k in keys.items():
        if k in seen and seen[k] != n:
            keys[n] = f"{mlflow_key(n, MAX_KEY - 7)}_{hashlib.sha1(n.encode()).hexdigest()[:6]}"
        seen[keys[n]] = n
    return keys


# ---- the tracking URI: checked up front, fail fast -------------------------------------------------------


def check_tracking_uri(uri: str, timeout: float = PREFLIGHT_TIMEOUT_S) -> str | None:
    """The problem with ``uri`` as one line, or None. http(s): GET <uri>/health within ``timeout`` seconds;
    sqlite: the folder of the file can be created (checked, not created); other schemes than ``SCHEMES`` are refused."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in SCHEMES:
        return f"tracking.uri {uri}: unknown scheme {scheme or '(none)'!r} (use one of: {', '.join(SCHEMES)})"
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    return f"tracking.uri {uri}: no MLflow server answers (GET /health: HTTP {r.status})"
        except urllib.error.HTTPError as e:
            return f"tracking.uri {uri}: no MLflow server answers (GET /health: HTTP {e.code})"
        except (OSError, ValueError) as e:
            return f"tracking.uri {uri}: no MLflow server answers ({_why(e, timeout)})"
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            return f"tracking.uri {uri}: use an absolute path (sqlite:////abs/mlflow.db)"
        existing = next(p for p in [path.parent, *path.parent.parents] if p.exists())  # nothing is written here
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            return f"tracking.uri {uri}: cannot create {path.parent} ({existing} is not a writable folder)"
    return None


def _why(e: BaseException, timeout: float) -> str:
    """'Connection refused', 'no answer within 3 s', 'Name or service not known', ..."""
    reason = getattr(e, "reason", None) or e
    if isinstance(reason, TimeoutError | socket.timeout) or "timed out" in str(reason):
        return f"no answer within {timeout:g} s"
    return getattr(reason, "strerror", None) or str(reason)


def configure_http(env: dict[str, str] | None = None) -> None:
    """Few, short HTTP retries for MLflow (its defaults retry for minutes): set unless already set."""
    env = os.environ if env is None else env
    env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)
    env.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
    env.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def sqlite_path(uri: str) -> Path | None:
    """The file of an absolute ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    return Path(path) if path.startswith("/") else None


# ---- the store: created once, under a file lock ----------------------------------------------------------

_READY: set[str] = set()


_HELD: dict[Path, int] = {}  # lock file -> depth: the lock is re-entrant within a process


@contextlib.contextmanager
def store_lock(uri: str, fallback_dir: str | Path | None = None) -> Iterator[None]:
    """An exclusive fcntl lock beside the sqlite file of ``uri`` (or in ``fallback_dir``; none otherwise).
    Re-entrant within a process (a second flock on a new descriptor would wait for the first forever)."""
    import fcntl

    db = sqlite_path(uri)
    lock = db.with_name(db.name + ".lock") if db else Path(fallback_dir) / ".soce.lock" if fallback_dir else None
    if lock is None or _HELD.get(lock):
        _HELD[lock] = _HELD.get(lock, 0) + 1 if lock else 0
        try:
            yield
        finally:
            if lock:
                _HELD[lock] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _HELD[lock] = 1
        try:
            yield
        finally:
            _HELD[lock] = 0
            fcntl.flock(fh, fcntl.LOCK_UN)


def client(uri: str) -> Any:
    """An MlflowClient; the first use of a sqlite store in a process creates/migrates it under a file lock,
    so concurrent first launches do not race in MLflow's migrations."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    configure_http()
    from mlflow.tracking import MlflowClient

    if uri in _READY or sqlite_path(uri) is None:
        return MlflowClient(tracking_uri=uri)
    with store_lock(uri):  # the store's tables are created or migrated on first use
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)
    _READY.add(uri)
    return c


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it (with its artifact location) if needed; it opens in the UI's
    model-training view (tag mlflow.experimentKind)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        if artifact_location and "://" not in artifact_location:
            Path(artifact_location).mkdir(parents=True, exist_ok=True)
            artifact_location = Path(artifact_location).resolve().as_uri()
        with store_lock(uri):
            exp = c.get_experiment_by_name(name)
            if exp is None:
                exp_id = c.create_experiment(
                    name,
                    artifact_location=artifact_location,
                    tags={"mlflow.experimentKind": "custom_model_development"},
                )
                return exp_id
    if exp.tags.get("mlflow.experimentKind") is None:
        c.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")
    return exp.experiment_id


def metric_name(name: str) -> str:
    """A metric key MLflow accepts (lm-eval keys look like 'acc,none'); see :func:`mlflow_key`."""
    return mlflow_key(name.replace(",", "_"))


def log_values(
    uri: str, run_id: str, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None
) -> dict[str, str]:
    """Params and metrics of a run in one batch, keys made valid; returns {key: real name} where they differ."""
    from mlflow.entities import Metric, Param

    now = _now_ms()
    pkeys, mkeys = mlflow_keys(list(params or {})), mlflow_keys(list(metrics or {}))
    client(uri).log_batch(
        run_id,
        metrics=[Metric(mkeys[k], float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(pkeys[k], str(v)[:6000]) for k, v in (params or {}).items()],
    )
    return {k: n for n, k in {**pkeys, **mkeys}.items() if k != n}


def _now_ms() -> int:
    return int(time.time() * 1000)


def find_runs(uri: str, experiment_id: str, tags: Mapping[str, str], statuses: tuple[str, ...] = ()) -> list[Any]:
    """Runs of the experiment carrying all ``tags`` (and one of ``statuses`` if given), newest first."""
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client(uri).search_runs(
        [experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1000
    )
    return [r for r in runs if not statuses or r.info.status in statuses]
