"""Hydra callbacks: the MLflow parent run of a multirun, created in the driver before any job starts.

- the tracking URI is checked first (one line, exit 2, within seconds: :func:`soce.tracking.store.check_tracking_uri`);
- the store and experiment are created in the driver under a file lock (no migration race between launches);
- the parent run is owned by the driver (host, pid, heartbeat): the same sweep launched again while it runs is
  refused with one line; after a crash (owner gone) the same command resumes it;
- ``mlflow_parent.json`` in the sweep dir tells the jobs their parent and the overrides that vary;
- a failed job marks the parent FAILED (Hydra skips ``on_multirun_end`` when a job raises);
- at the end: the sweep report, one baseline run per candidate, the UI views, parent FINISHED.

The resolver ``${soce.launch:}`` (soce.config.register_configs) makes each launch's output dirs unique.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from soce import __version__
from soce.files import write_json_atomic
from soce.tracking.naming import job_name, short_keys, sweep_key, varying_keys
from soce.tracking.runs import (
    PARENT_FILE,
    Heartbeat,
    RunBusy,
    end_run,
    read_parent,
    reap_orphans,
    resume_or_start,
    this_owner,
)
from soce.tracking.store import check_tracking_uri, client, ensure_experiment, store_lock

log = logging.getLogger(__name__)
_HEARTBEATS: dict[str, Heartbeat] = {}  # parent run id -> its heartbeat thread (driver only)


def fail(message: str) -> None:
    """One line on stderr, exit status 2 (Hydra reports exceptions with a traceback; SystemExit it leaves)."""
    print(f"soce: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class MlflowSweepCallback(Callback):
    """One MLflow parent run per multirun; its id and the varying overrides are left in the sweep dir."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        uri = OmegaConf.select(config, "tracking.uri")
        problem = check_tracking_uri(str(uri)) if uri else None
        if problem:
            fail(problem)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.on_run_start(config)
        t = config.tracking
        uri, sweep_dir = str(t.uri), Path(str(config.hydra.sweep.dir))
        overrides = list(config.hydra.overrides.task)
        key = sweep_key(overrides)
        tags = {
            "soce.kind": "sweep",
            "soce.version": __version__,
            "soce.sweep_dir": str(sweep_dir),
            "soce.overrides": " ".join(overrides)[:5000],
            "soce.varying": json.dumps(varying_keys(overrides)),
        }
        # find-or-create under one lock: two launches of the same sweep cannot both start (or resume) it
        with store_lock(uri, sweep_dir.parent):
            exp = ensure_experiment(uri, sweep_experiment(config), t.artifact_location)
            for run_id in reap_orphans(uri, exp):
                log.info("MLflow run %s was left RUNNING by a process that is gone: marked KILLED", run_id)
            try:
                run_id, resumed = resume_or_start(uri, exp, f"sweep {sweep_dir.name}", "soce.sweep_key", key, tags=tags)
            except RunBusy as e:
                fail(f"the same sweep is already running ({e}); wait for it to end, or change an override")
        if resumed:
            log.info("resuming the interrupted sweep of MLflow run %s", run_id)
        _HEARTBEATS[run_id] = Heartbeat(uri, run_id)  # not on self: the callback is pickled to the workers
        write_json_atomic(
            sweep_dir / PARENT_FILE,
            {
                "run_id": run_id,
                "experiment_id": exp,
                "uri": uri,
                "sweep_key": key,
                "varying": varying_keys(overrides),
                "owner": this_owner(),
            },
        )

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")
        parent = read_parent(str(sweep_dir)) if sweep_dir else None
        if parent is None:
            return
        if job_return.status == JobStatus.FAILED:  # Hydra skips on_multirun_end when a job raises
            end_run(parent.uri, parent.run_id, "FAILED")
            return
        try:
            label_job_run(config, parent.uri, parent.varying)
        except Exception as e:  # the label is a convenience: never fail a finished job over it
            log.warning("could not label the job's MLflow run: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        parent = read_parent(sweep_dir)
        if parent is None:
            return
        if parent.run_id in _HEARTBEATS:
            _HEARTBEATS.pop(parent.run_id).stop()
        try:
            finish_sweep(sweep_dir, parent)
        finally:
            end_run(parent.uri, parent.run_id, "FINISHED")


def sweep_experiment(config: DictConfig) -> str:
    """The experiment the sweep's jobs log to, so that the parent run lives beside them: ``tracking.experiment``,
    or for a score table that lacks the benchmark's categories, ``soce-<the benchmark in conf/ with its columns,
    else the CSV stem>`` (soce.job.inputs' rule)."""
    name = str(config.tracking.experiment)
    pool, bench = config.pool, config.benchmark
    if pool.source != "csv" or not pool.csv or name != f"soce-{bench.name}":
        return name
    from soce.benchmarks.scores import read_score_csv
    from soce.job.inputs import known_benchmark

    columns = list(read_score_csv(str(pool.csv), scale=pool.get("scale"))[0].columns)
    if not set(bench.categories) <= set(columns):
        return f"soce-{known_benchmark(columns) or Path(str(pool.csv)).stem}"
    return name


def label_job_run(config: DictConfig, uri: str, varying: list[str]) -> None:
    """Name the job's MLflow run by its varying overrides (tags mlflow.runName, soce.label, soce.overrides)
    unless the job already did; the run is the one its result.json names."""
    result = Path(str(OmegaConf.select(config, "hydra.runtime.output_dir"))) / "result.json"
    if not result.is_file():
        return
    run_id = json.loads(result.read_text()).get("mlflow_run_id")
    c = client(uri)
    if not run_id or c.get_run(run_id).data.tags.get("soce.label"):
        return
    name = job_name(
        list(OmegaConf.select(config, "hydra.overrides.task") or []), varying, OmegaConf.select(config, "strategy.name")
    )
    for k, v in {
        "mlflow.runName": name.label[:240],
        "soce.label": name.label[:5000],
        "soce.overrides": json.dumps(name.overrides)[:5000],
    }.items():
        c.set_tag(run_id, k, v)
    log_swept_params(c, run_id, name.overrides, varying)


def log_swept_params(c: Any, run_id: str, overrides: dict[str, str], varying: list[str]) -> None:
    """Each swept override as a param named by its short key (the name in run names: ``tau``), so the jobs view
    can show it as a column; skipped where the job logged that param itself, and for ``selection.*`` keys of a
    job that uses no selection (its soup does not depend on them)."""
    params = c.get_run(run_id).data.params
    uses_selection = "experts" in params
    for key, short in short_keys(varying).items():
        if key in overrides and short not in params and (uses_selection or not key.startswith("selection.")):
            c.log_param(run_id, short, overrides[key])


def finish_sweep(sweep_dir: Path, parent: Any) -> None:
    """The sweep's report (artifacts of the parent), its baseline runs and its UI views."""
    from soce.report.tables import load_results, log_sweep_baselines, save_sweep_views, write_sweep_report

    report = write_sweep_report(sweep_dir)
    c = client(parent.uri)
    if report is not None:
        for name in ("report.md", "report.html", "comparison.csv", "correlation.png", "scores.png", "weights.png"):
            if (sweep_dir / name).exists():
                c.log_artifact(parent.run_id, str(sweep_dir / name))
    results = load_results(sweep_dir)
    if results:
        log_sweep_baselines(parent, results)
        save_sweep_views(parent, results)
