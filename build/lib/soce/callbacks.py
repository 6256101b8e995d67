"""Hydra callbacks: the MLflow parent run of a multirun, created in the driver before any job starts.

Creating the store and the experiment in the driver also avoids the race of several job processes
migrating a fresh sqlite database at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from soce import __version__
from soce.scores import write_json_atomic
from soce.tracking import PARENT_FILE, end_run, ensure_experiment, resume_or_start

log = logging.getLogger(__name__)


def sweep_key(overrides: list[str]) -> str:
    """Identity of a sweep: its command-line overrides, order-free, without hydra.* and launcher settings."""
    keep = sorted(o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/")))
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()[:16]


class MlflowSweepCallback(Callback):
    """One MLflow parent run per multirun; its id is left in the sweep dir for the jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        t = config.tracking
        uri, name = t.uri, t.experiment
        exp = ensure_experiment(uri, name, t.artifact_location)
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = list(config.hydra.overrides.task)
        # the same command after an interrupted sweep resumes it (same parent run); after a finished one,
        # a new parent run is started
        run_id, resumed = resume_or_start(uri, exp, f"sweep {sweep_dir.name}", "soce.sweep_key", sweep_key(overrides),
                                          tags={"soce.kind": "sweep", "soce.version": __version__,
                                                "soce.sweep_dir": str(sweep_dir),
                                                "soce.overrides": " ".join(overrides)[:5000]})
        if resumed:
            log.info("resuming the interrupted sweep of MLflow run %s", run_id)
        write_json_atomic(sweep_dir / PARENT_FILE, {"run_id": run_id, "experiment_id": exp, "uri": uri,
                                                     "sweep_key": sweep_key(overrides)})

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # Hydra skips on_multirun_end when a job raises: mark the parent FAILED here.
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.FAILED:
            parent = _parent(config)
            if parent:
                end_run(parent["uri"], parent["run_id"], "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = _parent(config)
        if not parent:
            return
        from soce.report import write_sweep_report
        from soce.tracking import client

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            report = write_sweep_report(sweep_dir)
            if report is not None:
                for name in ("report.md", "comparison.csv", "correlation.png", "scores.png", "weights.png"):
                    if (sweep_dir / name).exists():
                        client(parent["uri"]).log_artifact(parent["run_id"], str(sweep_dir / name))
        finally:
            end_run(parent["uri"], parent["run_id"], "FINISHED")


def _parent(config: DictConfig) -> dict | None:
    try:
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")
    except Exception:
        return None
    marker = Path(str(sweep_dir)) / PARENT_FILE if sweep_dir else None
    return json.loads(marker.read_text()) if marker and marker.exists() else None
