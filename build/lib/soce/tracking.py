"""MLflow tracking: one experiment per benchmark, a parent run per multirun, a run per job, a nested
run per weight-search point.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so the driver
and the job processes of a sweep can each write to the same parent. Metric names are
``<split>.<category>`` (``test.overall``), params ``strategy``, ``pool``, ``benchmark``, ``tau`` and
``w.<candidate>`` for every candidate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"  # in a multirun's sweep dir: {"run_id", "experiment_id", "uri"}


def client(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it (with its artifact location) if needed."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if artifact_location and "://" not in artifact_location:
        Path(artifact_location).mkdir(parents=True, exist_ok=True)
        artifact_location = Path(artifact_location).resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    all_tags = {"mlflow.runName": name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client(uri).create_run(experiment_id, tags=all_tags).info.run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def metric_name(name: str) -> str:
    """MLflow refuses ',' in metric names (lm-eval keys look like 'acc,none')."""
    return name.replace(",", "_").replace(" ", "_")


def log_values(uri: str, run_id: str, params: Mapping[str, Any] | None = None,
               metrics: Mapping[str, float] | None = None) -> None:
    """Params and metrics of a run in one batch."""
    from mlflow.entities import Metric, Param

    now = _now_ms()
    c = client(uri)
    c.log_batch(
        run_id,
        metrics=[Metric(metric_name(k), float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
    )


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def split_metrics(scores: Mapping[str, Mapping[str, float]], prefix: str = "") -> dict[str, float]:
    """{split: {category: x}} -> {"<prefix><split>.<category>": x}."""
    return {f"{prefix}{s}.{c}": v for s, cats in scores.items() for c, v in cats.items()}


def find_runs(uri: str, experiment_id: str, tags: Mapping[str, str], statuses: tuple[str, ...] = ()) -> list[Any]:
    """Runs of the experiment carrying all ``tags`` (and one of ``statuses`` if given), newest first."""
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client(uri).search_runs([experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                                   max_results=1000)
    return [r for r in runs if not statuses or r.info.status in statuses]


def resume_or_start(uri: str, experiment_id: str, name: str, key_tag: str, key: str,
                    parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
                    resume_finished: bool = False) -> tuple[str, bool]:
    """(run id, resumed): an interrupted run (RUNNING, or FAILED/KILLED) with the same key is reopened
    instead of starting a duplicate; a FINISHED one too if ``resume_finished``."""
    want = {key_tag: key, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    ok = ("RUNNING", "FAILED", "KILLED") + (("FINISHED",) if resume_finished else ())
    found = find_runs(uri, experiment_id, want, ok)
    if found:
        run_id = found[0].info.run_id
        client(uri).update_run(run_id, status="RUNNING")
        return run_id, True
    return start_run(uri, experiment_id, name, parent_run_id, {**(tags or {}), key_tag: key}), False


@dataclass
class JobTracker:
    """The MLflow side of one job: its run, its nested search points, its artifacts.

    A job is identified by ``job_key`` (its sweep and its overrides): re-running an interrupted sweep
    reopens the same job run and logs only the search points that are missing, so nothing is duplicated
    and no run is left RUNNING.
    """

    uri: str
    experiment_id: str
    run_id: str
    points_done: dict[int, str] = field(default_factory=dict)  # point index -> run id (already logged)

    @classmethod
    def start(cls, uri: str, experiment: str, artifact_location: str | None, name: str,
              parent_run_id: str | None, tags: Mapping[str, str], job_key: str | None = None) -> JobTracker:
        exp = ensure_experiment(uri, experiment, artifact_location)
        if job_key is None:
            return cls(uri, exp, start_run(uri, exp, name, parent_run_id, tags))
        run_id, resumed = resume_or_start(uri, exp, name, "soce.job_key", job_key, parent_run_id, tags,
                                          resume_finished=parent_run_id is not None)
        tracker = cls(uri, exp, run_id)
        if resumed:
            for r in find_runs(uri, exp, {"mlflow.parentRunId": run_id, "soce.kind": "search_point"}):
                if r.info.status == "FINISHED":
                    tracker.points_done[int(r.data.tags["soce.point"])] = r.info.run_id
                else:  # a point cut off by the interruption: drop it, it is logged again
                    client(uri).delete_run(r.info.run_id)
        return tracker

    def log(self, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None) -> None:
        log_values(self.uri, self.run_id, params, metrics)

    def log_point(self, index: int, weights: Mapping[str, float], scores: Mapping[str, float],
                  split: str) -> None:
        """One weight-search point as a nested run: params w.<name>, metrics <split>.<category>."""
        if index in self.points_done:
            return
        point = start_run(self.uri, self.experiment_id, f"point-{index:03d}", self.run_id,
                          {"soce.kind": "search_point", "soce.point": str(index)})
        log_values(self.uri, point, {"point": index, **{f"w.{k}": v for k, v in weights.items()}},
                   {f"{split}.{k}": v for k, v in scores.items()})
        end_run(self.uri, point)
        self.points_done[index] = point

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        client(self.uri).log_artifact(self.run_id, str(path), subdir)

    def end(self, status: str = "FINISHED") -> None:
        end_run(self.uri, self.run_id, status)
