"""MLflow UI views that open on the answer: saved views (experiment tags), filters, columns, addresses."""

from __future__ import annotations

import json
import logging
from typing import Any

from soce.tracking.store import client

log = logging.getLogger(__name__)

JOBS_FILTER = "tags.`soce.kind` = 'job'"
VIEW_TAG = "mlflow.sharedViewState."  # experiment tag the MLflow UI reads for ?viewStateShareKey=<key>


# ---- MLflow UI: views that open on the answer ------------------------------------------------------------


def sweep_filter(parent_run_id: str | None = None, kind: str = "job") -> str:
    """The search filter of a sweep's job (or point, baseline) runs, as the UI and search_runs take it."""
    flt = f"tags.`soce.kind` = '{kind}'"
    return flt + (f" and tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else "")


def save_view(
    uri: str,
    experiment_id: str,
    key: str,
    search_filter: str,
    columns: list[str],
    order_by: str | None = None,
    parallel: tuple[list[str], list[str]] | None = None,
    name: str | None = None,
) -> str:
    """Store a UI view as the experiment tag ``mlflow.sharedViewState.<key>``, in the envelope MLflow 3.17's
    "Views" menu lists (``{name, createdAt, updatedAt, state}``, ``state`` the view's JSON as a string; the
    menu skips a bare state, which ``?viewStateShareKey=`` still opens): filter, visible columns
    (``params.`x```...), sort and optionally one parallel-coordinates chart (params, metrics). ``name``: the
    menu entry (default: ``key``). Returns ``key`` for ``?viewStateShareKey=``."""
    import time

    state: dict[str, Any] = {
        "searchFilter": search_filter,
        "orderByAsc": False,
        "selectedColumns": columns,
        "runListHidden": False,
        "viewMaximized": False,
    }
    if order_by:
        state["orderByKey"] = order_by
    if parallel:
        section = "soce"
        state["compareRunSections"] = [
            {
                "uuid": section,
                "name": "SoCE",
                "display": True,
                "isReordered": False,
                "deleted": False,
                "isGenerated": False,
            }
        ]
        state["compareRunCharts"] = [
            {
                "uuid": "soce-parallel",
                "type": "PARALLEL",
                "runsCountToCompare": 1000,
                "metricSectionId": section,
                "deleted": False,
                "isGenerated": False,
                "displayName": "weights vs " + ", ".join(parallel[1]),
                "selectedParams": parallel[0],
                "selectedMetrics": parallel[1],
                "showAllRuns": True,
            }
        ]
        state["isAccordionReordered"] = True
    now = int(time.time() * 1000)
    envelope = {"name": name or key, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client(uri).set_experiment_tag(experiment_id, VIEW_TAG + key, json.dumps(envelope))
    return key


def view_state(tag_value: str) -> dict[str, Any]:
    """The view state stored by :func:`save_view` (an envelope) or by older soce versions (the bare state)."""
    value = json.loads(tag_value)
    return json.loads(value["state"]) if isinstance(value.get("state"), str) else value


def column(kind: str, key: str) -> str:
    """A UI column id: column('metrics', 'test.overall') -> 'metrics.`test.overall`'."""
    return f"{kind}.`{key}`"


TRAINING = {"workflowType": "machine_learning"}  # MLflow 3.17's training view (its default is the GenAI one)


def ui_url(
    base: str, experiment_id: str, view: str | None = None, search_filter: str | None = None, mode: str = "TABLE"
) -> str:
    """The MLflow UI address of the experiment's runs tab in the training view: a saved view
    (``viewStateShareKey``) or a plain ``searchFilter``; ``mode``: TABLE or CHART (``compareRunsMode``).

    MLflow 3.17.2 picks its GenAI or training screens from ``workflowType``: this query parameter, else the
    browser's localStorage ``mlflow.workflowType_v1`` (written only by the header's GenAI / Model training
    switch), else GenAI; the experiment tag ``mlflow.experimentKind`` is not read (the UI's switch is compiled
    on). The server cannot choose the default, so every address soce prints carries the parameter."""
    from urllib.parse import urlencode

    q = {"viewStateShareKey": view} if view else {"searchFilter": search_filter or JOBS_FILTER}
    return (
        f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode({**TRAINING, **q, 'compareRunsMode': mode})}"
    )


def root_url(base: str) -> str:
    """The MLflow UI's experiment list in the training view."""
    from urllib.parse import urlencode

    return f"{base.rstrip('/')}/#/experiments?{urlencode(TRAINING)}"
