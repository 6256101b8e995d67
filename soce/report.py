"""Comparison tables and plots, read back from MLflow.

    python -m soce.report                       # latest sweep of the demo experiment, report split
    python -m soce.report experiment=soce-demo parent=<run id> split=test out=DIR

Rows: one per strategy of the sweep, plus the best single candidate (chosen on the selection split);
columns: the benchmark's categories and ``overall``, as percentages.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd


def correlation_heatmap(corr: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Write the category correlation matrix as an annotated heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(corr)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.6 + 0.6 * n))
    im = ax.imshow(corr.values, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), corr.columns, rotation=45, ha="right")
    ax.set_yticks(range(n), corr.index)
    for i in range(n):
        for j in range(n):
            v = corr.values[i, j]
            ax.text(j, i, "" if pd.isna(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="Pearson r")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def sweep_runs(uri: str, experiment: str, parent: str | None = None) -> tuple[str, pd.DataFrame]:
    """(parent run id, DataFrame of its job runs) for ``parent`` or the experiment's latest sweep."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} at {uri}")
    if parent is None:
        sweeps = mlflow.search_runs([exp.experiment_id], filter_string="tags.`soce.kind` = 'sweep'",
                                    order_by=["start_time DESC"], max_results=1)
        if sweeps.empty:
            raise LookupError(f"experiment {experiment!r} has no sweep (parent) run yet")
        parent = sweeps.iloc[0]["run_id"]
    jobs = mlflow.search_runs([exp.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`soce.kind` = 'job'")
    return parent, jobs


def comparison_table(jobs: pd.DataFrame, split: str) -> pd.DataFrame:
    """Strategies (and the best single candidate) x categories + overall, in percent, on ``split``."""
    if jobs.empty:
        raise LookupError("the sweep has no job runs")
    prefix = f"metrics.{split}."
    cols = [c for c in jobs.columns if c.startswith(prefix)]
    cats = [c[len(prefix):] for c in cols if not c.endswith(".overall")] + ["overall"]
    rows: dict[str, Any] = {}
    jobs = jobs.sort_values("start_time")
    for _, job in jobs.iterrows():
        rows[job["params.strategy"]] = {c: 100 * job[prefix + c] for c in cats}
    first = jobs.iloc[0]
    best = f"best single ({first['params.best_single']})"
    rows[best] = {c: 100 * first[f"metrics.best_single.{split}.{c}"] for c in cats}
    return pd.DataFrame.from_dict(rows, orient="index")[cats].round(2)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    head = "| | " + " | ".join(table.columns) + " |"
    sep = "|---" * (len(table.columns) + 1) + "|"
    body = ["| " + str(i) + " | " + " | ".join(f"{v:.2f}" for v in row) + " |" for i, row in table.iterrows()]
    return "\n".join([head, sep, *body])


def main(argv: list[str] | None = None) -> int:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    root = Path(args.get("root", ".")).resolve()
    uri = args.get("uri", f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    experiment = args.get("experiment", "soce-demo")
    split = args.get("split", "test")
    try:
        parent, jobs = sweep_runs(uri, experiment, args.get("parent"))
        table = comparison_table(jobs, split)
    except LookupError as e:
        print(f"soce.report: {e}", file=sys.stderr)
        return 2
    md = to_markdown(table)
    print(f"\nSoCE comparison on split '{split}' (accuracy %, sweep {parent}, experiment {experiment})\n")
    print(md)
    if "out" in args:
        out = Path(args["out"])
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "comparison.csv")
        (out / "comparison.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
