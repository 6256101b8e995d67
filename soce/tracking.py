"""MLflow tracking: one experiment per benchmark, a parent run per multirun, a run per job, a nested
run per weight-search point, one baseline run per candidate per sweep.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so the driver
and the job processes of a sweep can each write to the same parent.

Contracts:
- scores are fractions in [0, 1]; metrics are logged rounded to ``SCORE_DECIMALS`` (4) decimals, which is
  what the reports print as percent with 2 decimals (:func:`percent`, :func:`fmt_pct`: one rounding);
- metric and param keys go through :func:`mlflow_key` (any leaderboard name works); a run whose keys
  differ from the real names gets a ``names.json`` artifact ``{key: real name}``;
- a RUNNING run is owned (tag ``soce.owner`` = ``host:pid:start``, heartbeat tag ``soce.heartbeat``) and is
  only reopened once its owner is gone (:func:`owner_gone`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from soce.owners import _pid_alive, start_time

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"  # in a multirun's sweep dir: see ParentInfo
SCORE_DECIMALS = 4  # fractions logged with 4 decimals = percent with 2 decimals in every report
MAX_KEY = 250  # MLflow's limit on metric/param/tag key length
HEARTBEAT_S = 30.0  # an owned RUNNING run's heartbeat tag is refreshed this often (seconds)
STALE_AFTER_S = 300.0  # a run owned on ANOTHER host is gone after this long without a heartbeat (seconds)
HTTP_RETRIES, HTTP_TIMEOUT_S = "2", "20"  # MLflow's HTTP retry settings for jobs (its defaults: 7, 120 s)
PREFLIGHT_TIMEOUT_S = 3.0
SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")  # checked by soce.preflight
JOBS_FILTER = "tags.`soce.kind` = 'job'"
VIEW_TAG = "mlflow.sharedViewState."  # experiment tag the MLflow UI reads for ?viewStateShareKey=<key>


# ---- numbers: one rounding for logs, metrics and reports -------------------------------------------------

def percent(fraction: float) -> float:
    """A fraction as percent rounded to 2 decimals, half up on its decimal form (0.15975 -> 15.98)."""
    if fraction != fraction:  # NaN
        return fraction
    return float(Decimal(repr(float(fraction))).scaleb(2).quantize(Decimal("0.01"), ROUND_HALF_UP))


def score(fraction: float) -> float:
    """A fraction rounded as it is logged: ``percent(score(x)) == percent(x)`` for every x."""
    if fraction != fraction:
        return fraction
    return float(Decimal(repr(float(fraction))).quantize(Decimal(1).scaleb(-SCORE_DECIMALS), ROUND_HALF_UP))


def fmt_pct(fraction: float) -> str:
    """'15.98' for 0.15975: the way every table, log line and report prints a score."""
    return f"{percent(fraction):.2f}"


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
    return f"{safe[:limit - 7]}_{digest}"


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
    path = uri[len("sqlite:///"):]
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
                exp_id = c.create_experiment(name, artifact_location=artifact_location,
                                             tags={"mlflow.experimentKind": "custom_model_development"})
                return exp_id
    if exp.tags.get("mlflow.experimentKind") is None:
        c.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")
    return exp.experiment_id


# ---- owners: who may reopen a RUNNING run ----------------------------------------------------------------

def this_owner() -> str:
    """``host:pid:start`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}:{start_time(os.getpid()) or ''}"


def owner_gone(owner: str | None, heartbeat: float | None, now: float | None = None) -> bool:
    """Whether the process that owns a run is gone. No owner (older runs): gone. Same host: the pid is dead
    (os.kill(pid, 0)) or now another process. Another host: no heartbeat for ``STALE_AFTER_S`` seconds."""
    if not owner:
        return True
    host, pid_s, start = (owner.split(":") + ["", ""])[:3]
    if host != socket.gethostname():
        return heartbeat is None or (now or time.time()) - heartbeat > STALE_AFTER_S
    if not pid_s.isdigit():
        return True
    pid = int(pid_s)
    if not _pid_alive(pid):
        return True
    return bool(start) and start_time(pid) not in (None, start)


def _run_owner_gone(run: Any) -> bool:
    tags = run.data.tags
    hb = tags.get("soce.heartbeat")
    beat = float(hb) if hb else (run.info.start_time or 0) / 1000
    return owner_gone(tags.get("soce.owner"), beat)


def owner_tags() -> dict[str, str]:
    return {"soce.owner": this_owner(), "soce.heartbeat": f"{time.time():.0f}"}


class Heartbeat:
    """A daemon thread that refreshes a run's ``soce.heartbeat`` tag every ``HEARTBEAT_S`` seconds."""

    def __init__(self, uri: str, run_id: str, every: float = HEARTBEAT_S) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(uri, run_id, every), daemon=True)
        self._thread.start()

    def _beat(self, uri: str, run_id: str, every: float) -> None:
        while not self._stop.wait(every):
            with contextlib.suppress(Exception):  # a missed beat only makes the run look stale sooner
                client(uri).set_tag(run_id, "soce.heartbeat", f"{time.time():.0f}")

    def stop(self) -> None:
        self._stop.set()


class RunBusy(RuntimeError):
    """The run to resume is still owned by a live process."""

    def __init__(self, run: Any) -> None:
        self.run_id = run.info.run_id
        self.owner = run.data.tags.get("soce.owner", "?")
        host, pid = (self.owner.split(":") + ["?"])[:2]
        super().__init__(f"MLflow run {self.run_id} ({run.info.run_name}) is {run.info.status} in pid {pid} on {host}")


# ---- runs --------------------------------------------------------------------------------------------------

def start_run(uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    """A new run, owned by this process."""
    all_tags = {"mlflow.runName": name, **owner_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client(uri).create_run(experiment_id, tags=all_tags).info.run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def metric_name(name: str) -> str:
    """A metric key MLflow accepts (lm-eval keys look like 'acc,none'); see :func:`mlflow_key`."""
    return mlflow_key(name.replace(",", "_"))


def log_values(uri: str, run_id: str, params: Mapping[str, Any] | None = None,
               metrics: Mapping[str, float] | None = None) -> dict[str, str]:
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


def split_metrics(scores: Mapping[str, Mapping[str, float]], prefix: str = "") -> dict[str, float]:
    """{split: {category: x}} -> {"<prefix><split>.<category>": x rounded as logged (:func:`score`)}."""
    return {f"{prefix}{s}.{c}": score(v) for s, cats in scores.items() for c, v in cats.items()}


def find_runs(uri: str, experiment_id: str, tags: Mapping[str, str], statuses: tuple[str, ...] = ()) -> list[Any]:
    """Runs of the experiment carrying all ``tags`` (and one of ``statuses`` if given), newest first."""
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client(uri).search_runs([experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                                   max_results=1000)
    return [r for r in runs if not statuses or r.info.status in statuses]


def resume_or_start(uri: str, experiment_id: str, name: str, key_tag: str, key: str,
                    parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
                    resume_finished: bool = False) -> tuple[str, bool]:
    """(run id, resumed): an interrupted run (RUNNING, FAILED or KILLED) with the same key whose owner is gone
    is reopened (and owned by this process) instead of starting a duplicate; a FINISHED one too if
    ``resume_finished``. Raises :class:`RunBusy` if such a run's owner is still alive."""
    want = {key_tag: key, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    ok = ("RUNNING", "FAILED", "KILLED") + (("FINISHED",) if resume_finished else ())
    found = find_runs(uri, experiment_id, want, ok)
    busy = [r for r in found if r.info.status != "FINISHED" and not _run_owner_gone(r)]
    if busy:
        raise RunBusy(busy[0])
    if found:
        run_id = found[0].info.run_id
        c = client(uri)
        c.update_run(run_id, status="RUNNING")
        for k, v in {**owner_tags(), **(tags or {})}.items():
            c.set_tag(run_id, k, v)
        return run_id, True
    return start_run(uri, experiment_id, name, parent_run_id, {**(tags or {}), key_tag: key}), False


def reap_orphans(uri: str, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of the experiment whose owner is gone (a crashed or killed launch);
    they stay resumable by their own command. Returns their ids."""
    runs = client(uri).search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    dead = [r.info.run_id for r in runs if r.data.tags.get("soce.owner") and _run_owner_gone(r)]
    for run_id in dead:
        end_run(uri, run_id, "KILLED")
    return dead


# ---- the parent marker, labels ---------------------------------------------------------------------------

@dataclass
class ParentInfo:
    """What a multirun's driver leaves in ``<sweep dir>/mlflow_parent.json`` for its jobs."""

    run_id: str
    experiment_id: str
    uri: str
    sweep_key: str = ""
    varying: list[str] = field(default_factory=list)  # the override keys that vary across the sweep


def read_parent(sweep_dir: str | Path) -> ParentInfo | None:
    """The sweep's parent marker, or None (not a multirun, or no MLflow parent)."""
    marker = Path(sweep_dir) / PARENT_FILE
    if not marker.is_file():
        return None
    d = json.loads(marker.read_text())
    return ParentInfo(d["run_id"], d["experiment_id"], d["uri"], d.get("sweep_key", ""), list(d.get("varying", [])))


def parse_override(override: str) -> tuple[str, str]:
    """('selection.tau', '0.1') for 'selection.tau=0.1' (also '+x=..', '++x=..', '~x')."""
    key, _, value = override.lstrip("+~").partition("=")
    return key.split("@", 1)[0], value


def short_keys(keys: list[str]) -> dict[str, str]:
    """{key: shortest dotted suffix that no other key ends with}: 'selection.tau' -> 'tau'."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if not any(o != k and (o == short or o.endswith("." + short)) for o in keys):
                break
        out[k] = short
    return out


def job_label(task_overrides: list[str], varying_keys: list[str], strategy: str | None = None) -> str:
    """A job's name in tables, figures and MLflow: the strategy, then ``short=value`` for each override that
    varies across the sweep, e.g. 'soce_weighted tau=0.1'. ``strategy`` defaults to the override's value."""
    values = dict(parse_override(o) for o in task_overrides)
    strategy = strategy or values.get("strategy")
    short = short_keys([k for k in varying_keys if k != "strategy"])
    parts = [strategy] if strategy else []
    parts += [f"{short[k]}={values[k]}" for k in short if k in values]
    return " ".join(parts) or "job"


# ---- baselines: once per sweep ---------------------------------------------------------------------------

def log_baselines(uri: str, experiment_id: str, parent_run_id: str,
                  candidate_scores: Mapping[str, Mapping[str, Mapping[str, float]]], best: str) -> list[str]:
    """One run per candidate under the sweep's parent (tag soce.kind=baseline; ``soce.baseline`` is
    'best_single' for ``best``, else 'candidate'), metrics ``<split>.<category>``. Idempotent: a parent that
    already has baseline runs gets none again. Returns the baseline run ids."""
    have = find_runs(uri, experiment_id, {"mlflow.parentRunId": parent_run_id, "soce.kind": "baseline"})
    if have:
        return [r.info.run_id for r in have]
    ids = []
    for name, scores in candidate_scores.items():
        role = "best_single" if name == best else "candidate"
        label = f"best single ({name})" if name == best else f"candidate {name}"
        run_id = start_run(uri, experiment_id, label[:240], parent_run_id,
                           {"soce.kind": "baseline", "soce.baseline": role, "soce.label": label[:5000]})
        log_values(uri, run_id, {"candidate": name}, split_metrics(scores))
        end_run(uri, run_id)
        ids.append(run_id)
    return ids


# ---- MLflow UI: views that open on the answer ------------------------------------------------------------

def sweep_filter(parent_run_id: str | None = None, kind: str = "job") -> str:
    """The search filter of a sweep's job (or point, baseline) runs, as the UI and search_runs take it."""
    flt = f"tags.`soce.kind` = '{kind}'"
    return flt + (f" and tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else "")


def save_view(uri: str, experiment_id: str, key: str, search_filter: str, columns: list[str],
              order_by: str | None = None, parallel: tuple[list[str], list[str]] | None = None) -> str:
    """Store a UI view as the experiment tag ``mlflow.sharedViewState.<key>`` (what the UI's share button
    writes; plain JSON is accepted): filter, visible columns (``params.`x```...), sort and optionally one
    parallel-coordinates chart (params, metrics). Returns ``key`` for ``?viewStateShareKey=``."""
    state: dict[str, Any] = {"searchFilter": search_filter, "orderByAsc": False, "selectedColumns": columns,
                             "runListHidden": False, "viewMaximized": False}
    if order_by:
        state["orderByKey"] = order_by
    if parallel:
        section = "soce"
        state["compareRunSections"] = [{"uuid": section, "name": "SoCE", "display": True, "isReordered": False,
                                         "deleted": False, "isGenerated": False}]
        state["compareRunCharts"] = [{"uuid": "soce-parallel", "type": "PARALLEL", "runsCountToCompare": 1000,
                                      "metricSectionId": section, "deleted": False, "isGenerated": False,
                                      "displayName": "weights vs " + ", ".join(parallel[1]),
                                      "selectedParams": parallel[0], "selectedMetrics": parallel[1],
                                      "showAllRuns": True}]
        state["isAccordionReordered"] = True
    client(uri).set_experiment_tag(experiment_id, VIEW_TAG + key, json.dumps(state))
    return key


def column(kind: str, key: str) -> str:
    """A UI column id: column('metrics', 'test.overall') -> 'metrics.`test.overall`'."""
    return f"{kind}.`{key}`"


def ui_url(base: str, experiment_id: str, view: str | None = None, search_filter: str | None = None,
           mode: str = "TABLE") -> str:
    """The MLflow UI address of the experiment's runs tab: a saved view (``viewStateShareKey``) or a plain
    ``searchFilter``; ``mode``: TABLE or CHART (``compareRunsMode``)."""
    from urllib.parse import urlencode

    q = {"viewStateShareKey": view} if view else {"searchFilter": search_filter or JOBS_FILTER}
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode({**q, 'compareRunsMode': mode})}"


# ---- one job -----------------------------------------------------------------------------------------------

@dataclass
class JobTracker:
    """The MLflow side of one job: its run, its nested search points, its artifacts.

    A job is identified by ``job_key`` (its sweep and its overrides): re-running an interrupted sweep
    reopens the same job run (once its owner is gone) and logs only the search points that are missing,
    so nothing is duplicated and no run is left RUNNING.
    """

    uri: str
    experiment_id: str
    run_id: str
    points_done: dict[int, str] = field(default_factory=dict)  # point index -> run id (already logged)
    names: dict[str, str] = field(default_factory=dict)  # MLflow key -> real name, where they differ
    heartbeat: Heartbeat | None = None

    @classmethod
    def start(cls, uri: str, experiment: str, artifact_location: str | None, name: str,
              parent_run_id: str | None, tags: Mapping[str, str], job_key: str | None = None,
              label: str | None = None, overrides: list[str] | None = None) -> JobTracker:
        """Open the job's run. ``label`` (see :func:`job_label`) is its name and tag ``soce.label``;
        ``overrides`` (the job's task overrides) go to tag ``soce.overrides`` (JSON {key: value})."""
        exp = ensure_experiment(uri, experiment, artifact_location)
        tags = {**tags, **({"soce.label": label[:5000]} if label else {})}
        if overrides is not None:
            tags["soce.overrides"] = json.dumps(dict(parse_override(o) for o in overrides))[:5000]
        name = (label or name)[:240]
        if job_key is None:
            tracker = cls(uri, exp, start_run(uri, exp, name, parent_run_id, tags))
        else:
            run_id, resumed = resume_or_start(uri, exp, name, "soce.job_key", job_key, parent_run_id,
                                              {**tags, "mlflow.runName": name},
                                              resume_finished=parent_run_id is not None)
            tracker = cls(uri, exp, run_id)
            if resumed:
                tracker._collect_points()
        tracker.heartbeat = Heartbeat(uri, tracker.run_id)
        return tracker

    def _collect_points(self) -> None:
        for r in find_runs(self.uri, self.experiment_id, {"mlflow.parentRunId": self.run_id,
                                                          "soce.kind": "search_point"}):
            if r.info.status == "FINISHED":
                self.points_done[int(r.data.tags["soce.point"])] = r.info.run_id
            else:  # a point cut off by the interruption: drop it, it is logged again
                client(self.uri).delete_run(r.info.run_id)

    def log(self, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None) -> None:
        self.names.update(log_values(self.uri, self.run_id, params, metrics))

    def log_point(self, index: int, weights: Mapping[str, float], scores: Mapping[str, float],
                  split: str) -> None:
        """One weight-search point as a nested run: params w.<name>, metrics <split>.<category> (rounded)."""
        if index in self.points_done:
            return
        point = start_run(self.uri, self.experiment_id, f"point-{index:03d}", self.run_id,
                          {"soce.kind": "search_point", "soce.point": str(index)})
        self.names.update(log_values(self.uri, point, {"point": index, **{f"w.{k}": v for k, v in weights.items()}},
                                     {f"{split}.{k}": score(v) for k, v in scores.items()}))
        end_run(self.uri, point)
        self.points_done[index] = point

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        client(self.uri).log_artifact(self.run_id, str(path), subdir)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run; first log ``names.json`` ({MLflow key: real name}) if any key differs."""
        if self.heartbeat:
            self.heartbeat.stop()
        try:
            if self.names:
                client(self.uri).log_dict(self.run_id, dict(sorted(self.names.items())), "names.json")
        finally:
            end_run(self.uri, self.run_id, status)
