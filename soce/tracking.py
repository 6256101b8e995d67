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
from dataclasses import dataclass
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


@dataclass
class JobTracker:
    """The MLflow side of one job: its run, its nested search points, its artifacts."""

    uri: str
    experiment_id: str
    run_id: str

    @classmethod
    def start(cls, uri: str, experiment: str, artifact_location: str | None, name: str,
              parent_run_id: str | None, tags: Mapping[str, str]) -> JobTracker:
        exp = ensure_experiment(uri, experiment, artifact_location)
        return cls(uri, exp, start_run(uri, exp, name, parent_run_id, tags))

    def log(self, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None) -> None:
        log_values(self.uri, self.run_id, params, metrics)

    def log_point(self, index: int, weights: Mapping[str, float], scores: Mapping[str, float],
                  split: str) -> None:
        """One weight-search point as a nested run: params w.<name>, metrics <split>.<category>."""
        point = start_run(self.uri, self.experiment_id, f"point-{index:03d}", self.run_id,
                          {"soce.kind": "search_point"})
        log_values(self.uri, point, {"point": index, **{f"w.{k}": v for k, v in weights.items()}},
                   {f"{split}.{k}": v for k, v in scores.items()})
        end_run(self.uri, point)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        client(self.uri).log_artifact(self.run_id, str(path), subdir)

    def end(self, status: str = "FINISHED") -> None:
        end_run(self.uri, self.run_id, status)
