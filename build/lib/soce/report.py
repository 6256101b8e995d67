"""Comparison tables and plots, read back from MLflow.

    python -m soce.report                       # latest sweep of the demo experiment, report split
    python -m soce.report experiment=soce-demo parent=<run id> split=test out=DIR
    python -m soce.report dir=outputs/multirun/<date>   # from a multirun directory's result.json files

Rows: one per strategy of the sweep, plus the best single candidate (chosen on the selection split);
columns: the benchmark's categories and ``overall``, as percentages.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd


def sweep_runs(uri: str, experiment: str, parent: str | None = None) -> tuple[str, pd.DataFrame]:
    """(parent run id, DataFrame of its job runs) for ``parent`` or the experiment's latest sweep."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} at {uri}")
    def jobs_of(run_id: str) -> pd.DataFrame:
        return mlflow.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.`soce.kind` = 'job'")

    if parent is not None:
        return parent, jobs_of(parent)
    sweeps = mlflow.search_runs([exp.experiment_id], filter_string="tags.`soce.kind` = 'sweep'",
                                order_by=["start_time DESC"], max_results=50)
    if sweeps.empty:
        raise LookupError(f"experiment {experiment!r} has no sweep (parent) run yet")
    for run_id in sweeps["run_id"]:  # the latest sweep that has job runs (one that failed at start has none)
        jobs = jobs_of(run_id)
        if not jobs.empty:
            return run_id, jobs
    raise LookupError(f"none of the latest {len(sweeps)} sweeps of experiment {experiment!r} has job runs")


def comparison_table(jobs: pd.DataFrame, split: str) -> pd.DataFrame:
    """Strategies (and the best single candidate) x categories + overall, in percent, on ``split``.

    Jobs not (yet) scored on ``split`` (running, killed, failed) are left out; see :func:`unscored_jobs`."""
    if jobs.empty:
        raise LookupError("the sweep has no job runs")
    jobs = jobs[~jobs.index.isin(unscored_jobs(jobs, split).index)]
    if jobs.empty:
        raise LookupError(f"no job of the sweep has scores on split {split!r} yet")
    prefix = f"metrics.{split}."
    cols = [c for c in jobs.columns if c.startswith(prefix)]
    cats = [c[len(prefix):] for c in cols if not c.endswith(".overall")]
    if "params.categories" in jobs.columns and isinstance(jobs["params.categories"].iloc[0], str):
        cats = jobs["params.categories"].iloc[0].split(",")
    cats = [*cats, "overall"]
    rows: dict[str, Any] = {}
    jobs = jobs.sort_values("start_time")
    for _, job in jobs.iterrows():
        rows[job["params.strategy"]] = {c: 100 * job[prefix + c] for c in cats}
    first = jobs.iloc[0]
    best = f"best single ({first['params.best_single']})"
    rows[best] = {c: 100 * first[f"metrics.best_single.{split}.{c}"] for c in cats}
    return pd.DataFrame.from_dict(rows, orient="index")[cats].round(2)


def unscored_jobs(jobs: pd.DataFrame, split: str) -> pd.DataFrame:
    """The job runs without an overall score on ``split`` (still running, or interrupted before the end)."""
    col = f"metrics.{split}.overall"
    if col not in jobs.columns:
        return jobs
    return jobs[jobs[col].isna()]


def load_results(sweep_dir: str | Path) -> list[dict]:
    """The jobs' result.json files of a multirun directory, in job order."""
    files = sorted(Path(sweep_dir).glob("*/result.json"), key=lambda f: (len(f.parent.name), f.parent.name))
    return [json.loads(f.read_text()) | {"job_dir": str(f.parent)} for f in files]


def comparison_from_results(results: list[dict], split: str) -> pd.DataFrame:
    """Strategies (+ best single candidate, picked on the selection split) x categories + overall, in %.

    Jobs not scored on ``split`` are left out (sweep-mode points are scored on the selection split only)."""
    scored = [r for r in results if split in r["scores"]]
    if not scored:
        raise LookupError(f"no job of the sweep was scored on split {split!r}")
    cats = [*scored[0]["categories"], "overall"]
    rows = {_label(r): {c: 100 * r["scores"][split][c] for c in cats} for r in scored}
    best = scored[0]["best_single"]
    rows[f"best single ({best})"] = {c: 100 * scored[0]["candidate_scores"][best][split][c] for c in cats}
    return pd.DataFrame.from_dict(rows, orient="index")[cats].round(2)


def _label(result: dict) -> str:
    if result["strategy"] != "fixed":
        return result["strategy"]
    return "fixed " + "/".join(f"{w:g}" for w in result["weights"].values() if w > 0)


def family_correlation(corr: pd.DataFrame, families: dict[str, str]) -> tuple[float, float]:
    """(mean |r| within families, mean |r| across families) over distinct category pairs with a defined r."""
    within, across = [], []
    cats = [c for c in corr.columns if c in families]
    for i, a in enumerate(cats):
        for b in cats[i + 1:]:
            r = corr.at[a, b]
            if pd.notna(r):
                (within if families[a] == families[b] else across).append(abs(r))
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return mean(within), mean(across)


ORDERINGS = (  # (claim, larger row, smaller row, strict)
    ("soce_weighted > best single", "soce_weighted", "best", True),
    ("best single > uniform", "best", "uniform", True),
    ("soce_selected >= uniform", "soce_selected", "uniform", False),
    ("soce_weighted > soce_selected", "soce_weighted", "soce_selected", True),
    ("soce_weighted > uniform", "soce_weighted", "uniform", True),
)


def orderings(table: pd.DataFrame) -> list[tuple[str, bool, float]]:
    """The paper's orderings on ``table``'s overall column: (claim, holds, margin in points)."""
    overall = table["overall"]
    best = next((i for i in table.index if str(i).startswith("best single")), None)
    out = []
    for claim, hi, lo, strict in ORDERINGS:
        hi, lo = (best if hi == "best" else hi), (best if lo == "best" else lo)
        if hi in overall and lo in overall:
            margin = float(overall[hi] - overall[lo])
            out.append((claim, margin > 0 if strict else margin >= 0, round(margin, 2)))
    return out


def sweep_report(results: list[dict], split: str | None = None) -> str:
    """A short markdown report of one sweep: table, heatmap, experts and weights, families, orderings."""
    first = results[0]
    split = split or first.get("report_split", "test")
    table = comparison_from_results(results, split)
    corr = pd.DataFrame(first["correlation"]).T.astype(float)
    lines = [f"# SoCE sweep report: {first['benchmark']} / pool {first['pool']}", "",
             f"Selection split `{first.get('select_split')}` (correlation, experts, weights); "
             f"reported split `{split}` (accuracy %).", "", to_markdown(table), ""]
    if first.get("select_split") == split:
        lines += ["**Warning:** selection and report splits are the same (the paper's protocol): "
                  "the gains are optimistic.", ""]
    lines += ["## Orderings of the paper", ""]
    lines += [f"- {'holds' if ok else 'does NOT hold'}: {claim} ({m:+.2f} points)" for claim, ok, m in orderings(table)]
    lines += ["", "## Selection", "", f"- weak set L: {', '.join(first['weak_set']) or '(empty)'}",
              "- experts: " + ", ".join(f"{c} -> {m}" for c, m in first.get("expert_of", {}).items())]
    for r in results:
        ws = ", ".join(f"{m} {w:.2f}" for m, w in r["weights"].items() if w > 0)
        lines.append(f"- `{r['strategy']}` weights: {ws}")
    fam = first.get("families") or {}
    if fam:
        w, a = family_correlation(corr, fam)
        lines += ["", f"Mean |correlation| within families {w:.2f}, across families {a:.2f} "
                      f"(families: {', '.join(sorted(set(fam.values())))})."]
    lines += ["", "![scores by strategy](scores.png)", "", "![soup weights](weights.png)", "",
              "![category correlation](correlation.png)", ""]
    return "\n".join(lines)


def write_sweep_report(sweep_dir: str | Path) -> Path | None:
    """Write report.md, comparison.csv and the heatmap into the sweep dir; None if no job finished."""
    sweep_dir = Path(sweep_dir)
    results = load_results(sweep_dir)
    if not results:
        return None
    split = results[0].get("report_split", "test")
    if not any(split in r["scores"] for r in results):
        split = results[0]["select_split"]
    table = comparison_from_results(results, split)
    table.to_csv(sweep_dir / "comparison.csv")
    from soce.plots import scores_figure, weights_figure

    scores_figure(table, sweep_dir / "scores.png")
    if len(results) <= 12:  # a sweep of many weight points is read in the MLflow UI instead
        weights_figure({_label(r): r["weights"] for r in results}, sweep_dir / "weights.png")
    heat = Path(results[0]["job_dir"]) / "artifacts" / "correlation.png"
    if heat.exists():
        shutil.copyfile(heat, sweep_dir / "correlation.png")
    out = sweep_dir / "report.md"
    out.write_text(sweep_report(results, split))
    return out


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    head = "| | " + " | ".join(table.columns) + " |"
    sep = "|---" * (len(table.columns) + 1) + "|"
    body = ["| " + str(i) + " | " + " | ".join(f"{v:.2f}" for v in row) + " |" for i, row in table.iterrows()]
    return "\n".join([head, sep, *body])


USAGE = ("usage: python -m soce.report [experiment=soce-demo] [parent=RUN_ID] [dir=MULTIRUN_DIR] [split=test] "
         "[root=.] [uri=MLFLOW_URI] [out=DIR]")
KEYS = ("experiment", "parent", "dir", "split", "root", "uri", "out")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    bad = [a for a in argv if "=" not in a or a.split("=", 1)[0] not in KEYS]
    if bad:
        print(f"soce.report: error: unknown argument {bad[0]!r} (known: {', '.join(KEYS)})", file=sys.stderr)
        return 2
    args = dict(a.split("=", 1) for a in argv)
    root = Path(args.get("root", ".")).resolve()
    db = root / "outputs" / "mlflow.db"
    uri = args.get("uri", f"sqlite:///{db}")
    experiment = args.get("experiment", "soce-demo")
    split = args.get("split", "test")
    if "dir" not in args and "uri" not in args and not db.is_file():
        print(f"soce.report: error: no MLflow store at {db} (run `make run` first, or give root=, uri= or dir=)",
              file=sys.stderr)
        return 2
    try:
        if "dir" in args:
            table, source = comparison_from_results(load_results(args["dir"]), split), args["dir"]
        else:
            parent, jobs = sweep_runs(uri, experiment, args.get("parent"))
            table, source = comparison_table(jobs, split), f"MLflow sweep {parent}, experiment {experiment}"
            left = unscored_jobs(jobs, split)
            if not left.empty:
                names = ", ".join(f"{r.get('tags.mlflow.runName', r['run_id'])} ({r['status']})"
                                  for _, r in left.iterrows())
                print(f"soce.report: left out, no {split} scores yet: {names}", file=sys.stderr)
    except LookupError as e:
        print(f"soce.report: error: {e}", file=sys.stderr)
        return 2
    md = to_markdown(table)
    print(f"\nSoCE comparison on split '{split}' (accuracy %, {source})\n")
    print(md)
    if "out" in args:
        out = Path(args["out"])
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "comparison.csv")
        (out / "comparison.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
