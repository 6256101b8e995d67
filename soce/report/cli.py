"""``python -m soce.report``: comparison tables of a sweep, read back from MLflow (or a multirun folder).

python -m soce.report                       # the most recent sweep of any experiment, report split
python -m soce.report experiment=soce-demo parent=<run id> split=test out=DIR
python -m soce.report dir=outputs/multirun/<date>   # from a multirun directory's result.json files

python -m soce.report by=tau                 # overall, one column per value of a swept override
python -m soce.report url                    # the MLflow UI addresses of the latest sweep (make ui)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

USAGE = (
    "usage: python -m soce.report [experiment=NAME] [parent=RUN_ID] [dir=MULTIRUN_DIR] [split=test] "
    "[by=OVERRIDE_KEY] [root=.] [uri=MLFLOW_URI] [out=DIR]\n"
    "       python -m soce.report url [base=http://127.0.0.1:5000] [experiment=..] [parent=..] [root=.] [uri=..]\n"
    "Prints the comparison table of a sweep; without experiment= or parent=, the most recent sweep of any "
    "experiment in the store (outputs/mlflow.db under root=)."
)
KEYS = ("experiment", "parent", "dir", "split", "by", "root", "uri", "out", "base")


def _args(argv: list[str]) -> dict[str, str] | str:
    """{key: value} of ``key=value`` arguments (and 'url'), or the error line."""
    bad = [a for a in argv if a != "url" and ("=" not in a or a.split("=", 1)[0] not in KEYS)]
    if bad:
        return f"unknown argument {bad[0]!r} (known: url, {', '.join(KEYS)})"
    args = dict(a.split("=", 1) for a in argv if a != "url")
    if "url" in argv:
        args["url"] = "1"
    root = Path(args.get("root", ".")).resolve()
    db = root / "outputs" / "mlflow.db"
    args.setdefault("uri", f"sqlite:///{db}")
    args.setdefault("split", "test")
    if "dir" not in args and args["uri"] == f"sqlite:///{db}" and not db.is_file():
        return f"no MLflow store at {db} (run `make run` first, or give root=, uri= or dir=)"
    return args


def _table(args: dict[str, str]) -> tuple[pd.DataFrame, str, list[str], dict[str, str]]:
    """(table, source, varying keys, {label: value of by=}) from a multirun dir or MLflow."""
    from soce.report.tables import (
        baseline_runs,
        comparison_from_results,
        comparison_table,
        distinct_soups,
        load_results,
        run_labels,
        sweep_runs,
        unscored_jobs,
    )
    from soce.tracking.naming import parse_override

    split, by = args["split"], args.get("by")
    if "dir" in args:
        results = load_results(args["dir"])
        varying = results[0]["varying"] if results else []
        by = swept_key(by, varying) if by else None
        results = distinct_soups(results)
        table = comparison_from_results(results, split)
        values = {r["label"]: v for r in results for k, v in map(parse_override, r["overrides"]) if k == by}
        return table, args["dir"], varying, values
    import mlflow

    which = _experiment(args)
    parent, jobs = sweep_runs(args["uri"], args["experiment"], args.get("parent"))
    exp_id = str(jobs["experiment_id"].iloc[0]) if not jobs.empty else ""
    table = comparison_table(jobs, split, baseline_runs(args["uri"], exp_id, parent) if exp_id else None)
    left = unscored_jobs(jobs, split)
    if not left.empty:
        names = ", ".join(f"{r.get('tags.mlflow.runName', r['run_id'])} ({r['status']})" for _, r in left.iterrows())
        print(f"soce.report: left out, no {split} scores yet: {names}", file=sys.stderr)
    varying = json.loads(mlflow.MlflowClient(args["uri"]).get_run(parent).data.tags.get("soce.varying", "[]"))
    by = swept_key(by, varying) if by else None
    scored = jobs[~jobs.index.isin(left.index)].sort_values("start_time")
    if "tags.soce.distinct" in scored.columns:
        scored = scored[scored["tags.soce.distinct"] != "false"]
    values = {}
    for lab, (_, job) in zip(run_labels(scored), scored.iterrows(), strict=True):
        tag = job.get("tags.soce.overrides")
        ov = json.loads(tag) if isinstance(tag, str) and tag else {}
        if by in ov:
            values[lab] = ov[by]
    return table, f"MLflow sweep {parent}, experiment {args['experiment']}{which}", varying, values


def _experiment(args: dict[str, str]) -> str:
    """Fill in ``experiment`` when not given: the experiment of ``parent=``, else of the most recent sweep in
    the store; returns what to say about that choice ('' when the user named it)."""
    from soce.report.tables import latest_experiment

    if "experiment" in args:
        return ""
    args["experiment"] = latest_experiment(args["uri"], args.get("parent"))
    return "" if args.get("parent") else " (the most recent sweep of any experiment; experiment= picks another)"


def swept_key(by: str, varying: list[str]) -> str:
    """The override ``by=`` names: a swept key by the short name run names use (``tau`` for ``selection.tau``),
    else ``by`` as given (a full key); LookupError for the strategy, which names the rows already."""
    from soce.tracking.naming import short_keys

    short = short_keys(varying)
    key = next((k for k, s in short.items() if s == by), by)
    if key == "strategy":
        raise LookupError(
            "by=strategy: the strategy names the rows already; by= takes another swept override "
            f"({', '.join(s for k, s in short.items() if k != 'strategy') or 'none was swept'})"
        )
    return key


def print_urls(args: dict[str, str]) -> None:
    """The MLflow UI addresses of the latest sweep (or ``parent=``): its job runs, and per job with search
    points its parallel-coordinates view; the plain job filter if the sweep has no saved view."""
    import mlflow

    from soce.report.tables import run_labels, sweep_runs
    from soce.tracking.views import root_url, sweep_filter, ui_url

    base = args.get("base", "http://127.0.0.1:5000")
    c = mlflow.MlflowClient(args["uri"])
    try:
        _experiment(args)
        parent, jobs = sweep_runs(args["uri"], args["experiment"], args.get("parent"))
    except LookupError as e:
        print(f"MLflow UI: {base} ({e})")
        return
    exp_id = str(jobs["experiment_id"].iloc[0])
    view = c.get_run(parent).data.tags.get("soce.view")
    print(f"jobs of sweep {parent}: " + ui_url(base, exp_id, view, None if view else sweep_filter(parent)))
    print(
        f"  experiment {args['experiment']} (all its job runs): "
        + ui_url(base, exp_id, search_filter="")
        + f"\n  experiments: {root_url(base)}\n  (MLflow 3.17 opens its GenAI screens unless told otherwise: these "
        f"addresses say workflowType=machine_learning; for the plain root, open {base.rstrip('/')}/ and click "
        "'Model training' at the top once: this browser then keeps it)"
    )
    for lab, (_, job) in zip(run_labels(jobs), jobs.iterrows(), strict=True):
        if isinstance(job.get("tags.soce.view"), str) and job.get("tags.soce.distinct") != "false":
            print(
                f"  search points of {lab} (parallel coordinates): "
                + ui_url(base, exp_id, job["tags.soce.view"], mode="CHART")
            )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    from soce.report.tables import pivot, to_markdown

    args = _args(argv)
    if isinstance(args, str):
        print(f"soce.report: error: {args}", file=sys.stderr)
        return 2
    try:
        if "url" in args:
            print_urls(args)
            return 0
        table, source, varying, values = _table(args)
        if args.get("by"):
            table = pivot(table, values, args["by"])
    except LookupError as e:
        print(f"soce.report: error: {e}", file=sys.stderr)
        return 2
    md = to_markdown(table)
    what = f"overall by {args['by']}" if args.get("by") else "accuracy %"
    print(f"\nSoCE comparison on split '{args['split']}' ({what}, {source}); varied: {', '.join(varying) or 'none'}\n")
    print(md)
    if "out" in args:
        out = Path(args["out"])
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "comparison.csv", float_format="%.2f")
        (out / "comparison.md").write_text(md + "\n")
    return 0
