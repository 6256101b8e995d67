"""Runs and who owns them: a parent run per multirun, a run per job with its nested search points, one
baseline run per candidate per sweep.

A RUNNING run is owned (tag ``soce.owner`` = ``host:pid:start``, heartbeat tag ``soce.heartbeat``) and is
only reopened once its owner is gone (:func:`owner_gone`); an interrupted job reopens its own run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soce.files import _pid_alive, start_time
from soce.tracking.naming import JobName
from soce.tracking.numbers import score
from soce.tracking.store import client, ensure_experiment, find_runs, log_values

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"  # in a multirun's sweep dir: see ParentInfo
HEARTBEAT_S = 30.0  # an owned RUNNING run's heartbeat tag is refreshed this often (seconds)
STALE_AFTER_S = 300.0  # a run owned on ANOTHER host is gone after this long without a heartbeat (seconds)


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


def start_run(
    uri: str, experiment_id: str, name: str, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> str:
    """A new run, owned by this process."""
    all_tags = {"mlflow.runName": name, **owner_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client(uri).create_run(experiment_id, tags=all_tags).info.run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def split_metrics(scores: Mapping[str, Mapping[str, float]], prefix: str = "") -> dict[str, float]:
    """{split: {category: x}} -> {"<prefix><split>.<category>": x rounded as logged (:func:`score`)}."""
    return {f"{prefix}{s}.{c}": score(v) for s, cats in scores.items() for c, v in cats.items()}


def resume_or_start(
    uri: str,
    experiment_id: str,
    name: str,
    key_tag: str,
    key: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume_finished: bool = False,
) -> tuple[str, bool]:
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


# ---- baselines: once per sweep ---------------------------------------------------------------------------


def log_baselines(
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    candidate_scores: Mapping[str, Mapping[str, Mapping[str, float]]],
    best: str,
) -> list[str]:
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
        run_id = start_run(
            uri,
            experiment_id,
            label[:240],
            parent_run_id,
            {"soce.kind": "baseline", "soce.baseline": role, "soce.label": label[:5000]},
        )
        log_values(uri, run_id, {"candidate": name}, split_metrics(scores))
        end_run(uri, run_id)
        ids.append(run_id)
    return ids


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
    def start(
        cls,
        uri: str,
        experiment: str,
        artifact_location: str | None,
        name: JobName,
        parent_run_id: str | None,
        tags: Mapping[str, str],
    ) -> JobTracker:
        """Open the job's run, named ``name.label`` (tag ``soce.label``; the overrides as JSON in tag
        ``soce.overrides``). With ``name.key``, an interrupted run of the same job is reopened instead."""
        exp = ensure_experiment(uri, experiment, artifact_location)
        tags = {**tags, "soce.label": name.label[:5000], "soce.overrides": json.dumps(name.overrides)[:5000]}
        run_name = name.label[:240]
        if name.key is None:
            tracker = cls(uri, exp, start_run(uri, exp, run_name, parent_run_id, tags))
        else:
            run_id, resumed = resume_or_start(
                uri,
                exp,
                run_name,
                "soce.job_key",
                name.key,
                parent_run_id,
                {**tags, "mlflow.runName": run_name},
                resume_finished=parent_run_id is not None,
            )
            tracker = cls(uri, exp, run_id)
            if resumed:
                tracker._collect_points()
        tracker.heartbeat = Heartbeat(uri, tracker.run_id)
        return tracker

    def _collect_points(self) -> None:
        for r in find_runs(
            self.uri, self.experiment_id, {"mlflow.parentRunId": self.run_id, "soce.kind": "search_point"}
        ):
            if r.info.status == "FINISHED":
                self.points_done[int(r.data.tags["soce.point"])] = r.info.run_id
            else:  # a point cut off by the interruption: drop it, it is logged again
                client(self.uri).delete_run(r.info.run_id)

    def log(self, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None) -> None:
        self.names.update(log_values(self.uri, self.run_id, params, metrics))

    def log_point(self, index: int, weights: Mapping[str, float], scores: Mapping[str, float], split: str) -> None:
        """One weight-search point as a nested run: params w.<name> (6 decimals), metrics <split>.<category>
        (rounded as every score, :func:`soce.tracking.numbers.score`)."""
        if index in self.points_done:
            return
        point = start_run(
            self.uri,
            self.experiment_id,
            f"point-{index:03d}",
            self.run_id,
            {"soce.kind": "search_point", "soce.point": str(index)},
        )
        params = {"point": index, **{f"w.{k}": round(float(v), 6) for k, v in weights.items()}}
        self.names.update(log_values(self.uri, point, params, {f"{split}.{k}": score(v) for k, v in scores.items()}))
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
