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
