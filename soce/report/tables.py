"""Comparison tables of a sweep, read back from MLflow or from its jobs' ``result.json`` files.

Rows: one per job of the sweep, named by the overrides that vary across it (``soce_weighted tau=0.1``),
plus the best single candidate (chosen on the selection split); columns: the benchmark's categories and
``overall``, as percent with 2 decimals (:func:`soce.tracking.numbers.percent`, the one rounding of every report).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from soce.tracking.naming import job_name, merged_label, parse_override, short_keys
from soce.tracking.numbers import fmt_pct, percent
from soce.tracking.runs import ParentInfo, log_baselines, read_parent
from soce.tracking.store import client, find_runs, metric_name, mlflow_key
from soce.tracking.views import column, save_view, sweep_filter


def sweep_runs(uri: str, experiment: str, parent: str | None = None) -> tuple[str, pd.DataFrame]:
    """(parent run id, DataFrame of its job runs) for ``parent`` or the experiment's latest sweep."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} at {uri}")

    def jobs_of(run_id: str) -> pd.DataFrame:
        return mlflow.search_runs([exp.experiment_id], filter_string=sweep_filter(run_id))

    if parent is not None:
        return parent, jobs_of(parent)
    sweeps = mlflow.search_runs(
        [exp.experiment_id], filter_string="tags.`soce.kind` = 'sweep'", order_by=["start_time DESC"], max_results=50
    )
    if sweeps.empty:
        raise LookupError(f"experiment {experiment!r} has no sweep (parent) run yet")
    for run_id in sweeps["run_id"]:  # the latest sweep that has job runs (one that failed at start has none)
        jobs = jobs_of(run_id)
        if not jobs.empty:
            return run_id, jobs
    raise LookupError(f"none of the latest {len(sweeps)} sweeps of experiment {experiment!r} has job runs")


def latest_experiment(uri: str, parent: str | None = None) -> str:
    """The name of the experiment holding run ``parent``, else the most recent sweep (parent run) of any
    experiment; LookupError when the store has none."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if parent is not None:
        return mlflow.get_experiment(mlflow.get_run(parent).info.experiment_id).name
    sweeps = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`soce.kind` = 'sweep'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    if sweeps.empty:
        raise LookupError(f"no sweep in {uri} yet (a multirun makes one: python -m soce -m strategy=a,b)")
    return mlflow.get_experiment(str(sweeps["experiment_id"].iloc[0])).name


def baseline_runs(uri: str, experiment_id: str, parent: str) -> pd.DataFrame:
    """The sweep's baseline runs (one per candidate; tag soce.baseline = best_single | candidate)."""
    import mlflow

    return mlflow.search_runs([experiment_id], filter_string=sweep_filter(parent, "baseline"))


def run_labels(jobs: pd.DataFrame) -> list[str]:
    """Each job run's label (tag soce.label, else its run name, else its strategy), made unique."""

    def one(job: pd.Series) -> str:
        for col in ("tags.soce.label", "tags.mlflow.runName", "params.strategy"):
            if isinstance(job.get(col), str) and job[col]:
                return job[col]
        return str(job["run_id"])[:8]

    return unique([one(j) for _, j in jobs.iterrows()])


def unique(labels: list[str]) -> list[str]:
    """Labels with repeats numbered ('a', 'a #2'): two jobs never share a row."""
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} #{seen[lab]}")
    return out


def comparison_table(jobs: pd.DataFrame, split: str, baselines: pd.DataFrame | None = None) -> pd.DataFrame:
    """Jobs (one row each, named by :func:`run_labels`) and the best single candidate x categories +
    overall, in percent (:func:`percent`), on ``split``. The best single candidate comes from the sweep's
    baseline runs, or (older sweeps) from the jobs' ``best_single.*`` metrics.

    Jobs not (yet) scored on ``split`` (running, killed, failed) are left out; see :func:`unscored_jobs`."""
    if jobs.empty:
        raise LookupError("the sweep has no job runs")
    jobs = jobs[~jobs.index.isin(unscored_jobs(jobs, split).index)]
    if "tags.soce.distinct" in jobs.columns:  # one row per distinct soup (soce.report.tables.distinct_soups)
        jobs = jobs[jobs["tags.soce.distinct"] != "false"]
    if jobs.empty:
        raise LookupError(f"no job of the sweep has scores on split {split!r} yet")
    prefix = f"metrics.{split}."
    cols = [c for c in jobs.columns if c.startswith(prefix) and not c.startswith(f"{prefix}overall")]
    cats = [c[len(prefix) :] for c in cols]
    if "params.categories" in jobs.columns and isinstance(jobs["params.categories"].iloc[0], str):
        cats = [metric_name(c) for c in jobs["params.categories"].iloc[0].split(",")]
    cats = [*cats, "overall"]
    jobs = jobs.sort_values("start_time")
    rows = {
        lab: {c: percent(job[prefix + c]) for c in cats}
        for lab, (_, job) in zip(run_labels(jobs), jobs.iterrows(), strict=True)
    }
    best = _best_baseline(baselines)
    if best is not None and prefix + "overall" in best:
        rows[str(best["tags.soce.label"])] = {c: percent(best.get(prefix + c, float("nan"))) for c in cats}
    elif f"metrics.best_single.{split}.overall" in jobs.columns:
        first = jobs.iloc[0]
        rows[f"best single ({first['params.best_single']})"] = {
            c: percent(first[f"metrics.best_single.{split}.{c}"]) for c in cats
        }
    return pd.DataFrame.from_dict(rows, orient="index")[cats]


def _best_baseline(baselines: pd.DataFrame | None) -> pd.Series | None:
    if baselines is None or baselines.empty or "tags.soce.baseline" not in baselines.columns:
        return None
    best = baselines[baselines["tags.soce.baseline"] == "best_single"]
    return None if best.empty else best.iloc[0]


def unscored_jobs(jobs: pd.DataFrame, split: str) -> pd.DataFrame:
    """The job runs without an overall score on ``split`` (still running, or interrupted before the end)."""
    col = f"metrics.{split}.overall"
    if col not in jobs.columns:
        return jobs
    return jobs[jobs[col].isna()]


def load_results(sweep_dir: str | Path) -> list[dict]:
    """The jobs' result.json files of a multirun directory, in job order, each with ``job_dir``,
    ``overrides`` (the job's task overrides, from Hydra's .hydra/overrides.yaml) and ``label``."""
    import yaml

    files = sorted(Path(sweep_dir).glob("*/result.json"), key=lambda f: (len(f.parent.name), f.parent.name))
    results = []
    for f in files:
        ov = f.parent / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in (yaml.safe_load(ov.read_text()) or [])] if ov.is_file() else []
        results.append(json.loads(f.read_text()) | {"job_dir": str(f.parent), "overrides": overrides})
    parent = read_parent(sweep_dir)
    label_results(results, parent.varying if parent and parent.varying else None)
    return results


def varying_from(results: list[dict]) -> list[str]:
    """The override keys whose values differ between the results' jobs (or are missing in some), in order."""
    per_job = [dict(parse_override(o) for o in r.get("overrides", [])) for r in results]
    keys = list(dict.fromkeys(k for d in per_job for k in d))
    return [k for k in keys if not k.startswith("hydra") and len({d.get(k) for d in per_job}) > 1]


def label_results(results: list[dict], varying: list[str] | None = None) -> list[str]:
    """Set each result's ``label`` (:func:`soce.tracking.naming.job_name` over ``varying``, default
    :func:`varying_from`) and ``varying``; labels are unique. Returns the varying keys."""
    varying = varying_from(results) if varying is None else varying
    labels = unique([job_name(r.get("overrides", []), varying, _strategy_label(r)).label for r in results])
    for r, lab in zip(results, labels, strict=True):
        r["label"], r["varying"] = lab, varying
    return varying


def distinct_soups(results: list[dict]) -> list[dict]:
    """One result per distinct soup (same strategy, merge operator and its base, weights to 6 decimals and
    scores), in job order: a group of jobs whose overrides could not change their soup (tau for uniform) keeps
    its first job, labelled with the values it stands for (:func:`soce.tracking.naming.merged_label`) and
    ``same_soup`` listing the jobs' labels. Two operators never make one soup, even where the scores tie
    (linear and task_arithmetic with lambda 1 differ in rounding)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:  # same weights and same scores on every split: one soup (a swept limit or dtype is not)
        soup = tuple(sorted((m, round(float(w), 6)) for m, w in r["weights"].items() if w > 0))
        op = r.get("merge") or {"method": "linear"}
        made_by = json.dumps([op, r.get("base") if op.get("method") != "linear" else None], sort_keys=True)
        groups.setdefault((r["strategy"], made_by, soup, json.dumps(r.get("scores"), sort_keys=True)), []).append(r)
    out = []
    for members in groups.values():
        first = dict(members[0])
        if len(members) > 1:
            varying = first.get("varying") or []
            first["label"] = merged_label([m.get("overrides", []) for m in members], varying, _strategy_label(first))
            first["same_soup"] = [_label(m) for m in members]
        out.append(first)
    return out


def _strategy_label(result: dict) -> str:
    if result["strategy"] != "fixed":
        return result["strategy"]
    return "fixed " + "/".join(f"{w:g}" for w in result["weights"].values() if w > 0)


def _label(result: dict) -> str:
    return result.get("label") or _strategy_label(result)


def best_candidate(results: list[dict]) -> tuple[str, dict] | None:
    """(name, {split: scores}) of the best single candidate of the sweep (picked on the selection split)."""
    first = results[0]
    cands = first.get("candidate_scores") or {}
    if not cands:
        return None
    best = first.get("best_single")
    if best is None:
        split = first.get("select_split") or next(iter(next(iter(cands.values()))))
        best = max(cands, key=lambda m: cands[m].get(split, {}).get("overall", float("-inf")))
    return best, cands[best]


def comparison_from_results(results: list[dict], split: str) -> pd.DataFrame:
    """Jobs (one row each, by label) + the best single candidate (picked on the selection split) x
    categories + overall, in percent (:func:`percent`).

    Jobs not scored on ``split`` are left out (sweep-mode points are scored on the selection split only)."""
    scored = [r for r in results if split in r["scores"]]
    if not scored:
        raise LookupError(f"no job of the sweep was scored on split {split!r}")
    cats = [*scored[0]["categories"], "overall"]
    rows = {_label(r): {c: percent(r["scores"][split][c]) for c in cats} for r in scored}
    best = best_candidate(scored)
    if best is not None and split in best[1]:
        rows[f"best single ({best[0]})"] = {c: percent(best[1][split][c]) for c in cats}
    return pd.DataFrame.from_dict(rows, orient="index")[cats]


def pivot(table: pd.DataFrame, values: dict[str, str], by: str, column: str = "overall") -> pd.DataFrame:
    """``table[column]`` (rows: job labels) pivoted by one override: rows = the rest of each label, columns =
    ``<short key>=<value>``. ``values``: {label: that job's value of ``by``}; a label that names several values
    (one soup for several jobs, 'uniform tau=0.3,0.6') fills each of their columns; rows without one are dropped."""
    short = by.rsplit(".", 1)[-1]
    cells: dict[str, dict[str, float]] = {}
    for lab in table.index:
        named = [p.split("=", 1)[1] for p in str(lab).split(" ") if p.startswith(f"{short}=")]
        vals = named[0].split(",") if named and "," in named[0] else ([values[lab]] if lab in values else [])
        rest = " ".join(p for p in str(lab).split(" ") if not p.startswith(f"{short}=")) or "all"
        for v in vals:
            cells.setdefault(rest, {})[f"{short}={v}"] = table.at[lab, column]
    if not cells:
        raise LookupError(f"no job of the sweep sets {by!r} (by= takes a swept override key)")
    return pd.DataFrame.from_dict(cells, orient="index")


def family_correlation(corr: pd.DataFrame, families: dict[str, str]) -> tuple[float, float]:
    """(mean |r| within families, mean |r| across families) over distinct category pairs with a defined r."""
    within, across = [], []
    cats = [c for c in corr.columns if c in families]
    for i, a in enumerate(cats):
        for b in cats[i + 1 :]:
            r = corr.at[a, b]
            if pd.notna(r):
                (within if families[a] == families[b] else across).append(abs(r))
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return mean(within), mean(across)


FIGURES = (
    ("scores.png", "scores by job"),
    ("weights.png", "soup weights"),
    ("correlation.png", "category correlation"),
)  # (file, alt text) of report.md's figures

ORDERINGS = (  # (claim, larger row, smaller row, strict)
    ("soce_weighted > best single", "soce_weighted", "best", True),
    ("best single > uniform", "best", "uniform", True),
    ("soce_selected >= uniform", "soce_selected", "uniform", False),
    ("soce_weighted > soce_selected", "soce_weighted", "soce_selected", True),
    ("soce_weighted > uniform", "soce_weighted", "uniform", True),
)


def orderings(table: pd.DataFrame, strategies: dict[str, str] | None = None) -> list[tuple[str, bool, float]]:
    """The paper's orderings on ``table``'s overall column: (claim, holds, margin in points).

    ``strategies``: {row label: strategy} (default: each row is its strategy). Rows that differ in other
    overrides too are compared within each group of equal other overrides; the claim then names the group,
    e.g. 'soce_weighted > uniform (tau=0.1)'."""
    overall = table["overall"]
    best = next((i for i in table.index if str(i).startswith("best single")), None)
    strategies = strategies or {str(i): str(i) for i in table.index if i != best}
    groups: dict[str, dict[str, str]] = {}
    for lab, strat in strategies.items():
        rest = lab[len(strat) :].strip() if lab.startswith(strat) else lab
        groups.setdefault(rest, {})[strat] = lab
    out = []
    for rest, rows in groups.items():
        for claim, hi, lo, strict in ORDERINGS:
            h, lo_ = (best if hi == "best" else rows.get(hi)), (best if lo == "best" else rows.get(lo))
            if h is not None and lo_ is not None and h in overall and lo_ in overall:
                margin = round(float(overall[h] - overall[lo_]), 2)
                out.append((claim + (f" ({rest})" if rest else ""), margin > 0 if strict else margin >= 0, margin))
    return out


def sweep_report(
    results: list[dict], split: str | None = None, figures: list[tuple[str, str]] | tuple = FIGURES
) -> str:
    """A short markdown report of one sweep: the overrides that varied, one row per job, heatmap, experts and
    weights per job, families, orderings."""
    first = results[0]
    split = split or first.get("report_split", "test")
    table = comparison_from_results(results, split)
    corr = pd.DataFrame(first["correlation"]).T.astype(float)
    varied = ", ".join(f"`{k}`" for k in first.get("varying", [])) or "none"
    lines = [
        f"# SoCE sweep report: {first['benchmark']} / pool {first['pool']}",
        "",
        f"{len(results)} jobs; overrides that varied: {varied}. Rows are named by them.",
        "",
        f"Selection split `{first.get('select_split')}` (correlation, experts, weights); "
        f"reported split `{split}` (accuracy %).",
        "",
        *_items_lines(first),
        to_markdown(table),
        "",
    ]
    if first.get("select_split") == split:
        lines += [
            "**Warning:** selection and report splits are the same (the paper's protocol): the gains are optimistic.",
            "",
        ]
    strategies = {_label(r): r["strategy"] for r in results if split in r["scores"]}
    lines += ["## Orderings of the paper", ""]
    lines += [
        f"- {'holds' if ok else 'does NOT hold'}: {claim} ({m:+.2f} points)"
        for claim, ok, m in orderings(table, strategies)
    ]
    lines += ["", "## Selection", ""]
    for r in results:
        ws = ", ".join(f"{m} {w:.2f}" for m, w in r["weights"].items() if w > 0)
        lines.append(f"- `{_label(r)}`: {selection_text(r)}; weights: {ws}{collapse_note(r)}")
    fam = first.get("families") or {}
    if fam:
        w, a = family_correlation(corr, fam)
        lines += [
            "",
            f"Mean |correlation| within families {w:.2f}, across families {a:.2f} "
            f"(families: {', '.join(sorted(set(fam.values())))}).",
        ]
    same = [r for r in results if r.get("same_soup")]
    if same:
        lines += [
            "",
            "Jobs that made the same soup are shown once: "
            + "; ".join(f"`{r['label']}` stands for {', '.join(f'`{x}`' for x in r['same_soup'])}" for r in same)
            + ".",
        ]
    for file, alt in figures:
        lines += ["", f"![{alt}]({file})"]
    return "\n".join([*lines, ""])


def collapse_note(result: dict) -> str:
    """' (the soup collapsed to one model: X)' for a SoCE soup whose experts are one model, else ''."""
    live = [m for m, w in result.get("weights", {}).items() if w > 0]
    if len(live) != 1 or result.get("strategy") not in ("soce_selected", "soce_weighted"):
        return ""
    return f" (the soup collapsed to one model: every category in L picks {live[0]})"


def _items_lines(result: dict) -> list[str]:
    """Which items were used and the metric of each category (from result.json), as report lines."""
    lines = []
    if result.get("items", {}).get("statement"):
        lines.append(f"Items: {result['items']['statement']}.")
    metrics = result.get("metrics") or {}
    if metrics:
        lines.append("Metrics: " + ", ".join(f"{c} `{m}`" for c, m in metrics.items()) + ".")
    return [*lines, ""] if lines else []


def write_sweep_report(sweep_dir: str | Path) -> Path | None:
    """Write report.md (figures as Markdown images beside it), report.html (the same, figures embedded: what
    the MLflow UI shows, its Markdown viewer prints images as text), comparison.csv (one row per distinct
    soup) and the figures into the sweep dir; None if no job finished."""
    sweep_dir = Path(sweep_dir)
    results = distinct_soups(load_results(sweep_dir))
    if not results:
        return None
    split = results[0].get("report_split", "test")
    if not any(split in r["scores"] for r in results):
        split = results[0].get("select_split", "")
    if not any(split in r["scores"] for r in results):  # scores only: no soup was scored
        return None
    table = comparison_from_results(results, split)
    table.to_csv(sweep_dir / "comparison.csv", float_format="%.2f")
    from soce.report.plots import scores_figure, weights_figure

    scores_figure(table, sweep_dir / "scores.png")
    if len(results) <= 12:  # a sweep of many weight points is read in the MLflow UI instead
        weights_figure({_label(r): r["weights"] for r in results}, sweep_dir / "weights.png")
    heat = Path(results[0]["job_dir"]) / "artifacts" / "correlation.png"
    if heat.exists():
        shutil.copyfile(heat, sweep_dir / "correlation.png")
    out = sweep_dir / "report.md"
    md = sweep_report(results, split, [f for f in FIGURES if (sweep_dir / f[0]).exists()])
    out.write_text(md)
    (sweep_dir / "report.html").write_text(markdown_html(md, sweep_dir))
    return out


def markdown_html(md: str, folder: Path) -> str:
    """A standalone HTML page of the Markdown ``md`` (tables included), its images read from ``folder`` and
    embedded as data URIs (so the page shows its figures wherever it is opened, the MLflow UI included)."""
    import base64
    import re

    from markdown_it import MarkdownIt

    def embed(m: re.Match) -> str:
        f = folder / m.group(2)
        if not f.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()})"

    body = MarkdownIt("commonmark").enable("table").render(re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", embed, md))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:1em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{body}</body></html>"


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no extra dependency); values printed with 2 decimals."""
    head = "| | " + " | ".join(str(c) for c in table.columns) + " |"
    sep = "|---" * (len(table.columns) + 1) + "|"
    body = ["| " + str(i) + " | " + " | ".join(f"{v:.2f}" for v in row) + " |" for i, row in table.iterrows()]
    return "\n".join([head, sep, *body])


def format_answer(result: dict, path: str | Path | None = None) -> str:
    """The log line of a finished job: scores (percent, as the reports print them), L, experts, weights and
    where result.json is, e.g. 'soce_selected: L = x1, y1; experts: x1 -> alpha, y1 -> beta; weights: alpha
    0.50, beta 0.50; result: /out/result.json'."""
    parts = [f"{s} overall {fmt_pct(v['overall'])}%" for s, v in result.get("scores", {}).items()]
    parts.append(selection_text(result))
    ws = ", ".join(f"{m} {w:.2f}" for m, w in result.get("weights", {}).items() if w > 0)
    parts.append(f"weights: {ws or '(none)'}{collapse_note(result)}")
    where = path or (Path(result["job_dir"]) / "result.json" if result.get("job_dir") else None)
    if where:
        parts.append(f"result: {where}")
    return f"{result.get('label') or result['strategy']}: " + "; ".join(parts)


def selection_text(result: dict) -> str:
    """What the job's soup was selected from: 'no selection' for strategies that use none (uniform,
    best_single, greedy_soup, fixed); else L, the experts in the soup, and the experts that
    ``selection.max_experts`` dropped, named with the cap."""
    if not result.get("selects", True):
        return "no selection"
    pairs = lambda d: ", ".join(f"{c} -> {m}" for c, m in d.items()) or "(none)"  # noqa: E731
    weak = ", ".join(result.get("weak_set") or []) or "(empty)"
    weights = result.get("weights") or {}
    of = result.get("expert_of") or {}
    zero = {c: m for c, m in of.items() if weights and not weights.get(m)}  # the search gave them weight 0
    text = f"L = {weak}; experts: {pairs({c: m for c, m in of.items() if c not in zero})}"
    if zero:
        text += f"; searched to weight 0: {pairs(zero)}"
    if result.get("dropped"):
        text += f"; dropped by selection.max_experts={result.get('max_experts')}: {pairs(result['dropped'])}"
    return text


def log_sweep_baselines(parent: ParentInfo, results: list[dict]) -> list[str]:
    """The sweep's candidate baselines, once (see :func:`soce.tracking.runs.log_baselines`)."""
    best = best_candidate(results)
    if best is None:
        return []
    return log_baselines(parent.uri, parent.experiment_id, parent.run_id, results[0]["candidate_scores"], best[0])


def save_sweep_views(parent: ParentInfo, results: list[dict]) -> dict[str, str]:
    """Saved MLflow UI views, listed in the experiment's "Views" menu: the sweep's job runs, one per distinct
    soup (:func:`distinct_soups`; the others are tagged ``soce.distinct=false`` and the kept one is relabelled),
    best first, showing the swept overrides (as params named by their short keys) and the overall scores
    first, then the experts; and for each job with search points a chart view with one parallel-coordinates
    chart of its experts' weights against the selection-split overall. Keys are left as tags ``soce.view`` on
    the parent and the job runs. Returns {'jobs': key, <job label>: key, ...}."""
    first = results[0]
    sel = first.get("select_split") or next(iter(next(iter(first["candidate_scores"].values()), {})), "dev")
    rep = first.get("report_split", "test")
    main_split = rep if any(rep in r["scores"] for r in results) else sel
    kept = distinct_soups(results)
    c = client(parent.uri)
    _tag_distinct(c, results, kept)
    swept = list(short_keys(first.get("varying") or []).values())
    cols = [
        *(column("params", k) for k in swept),
        column("metrics", f"{main_split}.overall"),
        column("metrics", f"{sel}.overall"),
        column("params", "experts"),
    ]
    flt = sweep_filter(parent.run_id) + " and tags.`soce.distinct` = 'true'"
    keys = {
        "jobs": save_view(
            parent.uri,
            parent.experiment_id,
            f"soce-{parent.run_id}",
            flt,
            list(dict.fromkeys(cols)),
            order_by=column("metrics", f"{main_split}.overall"),
            name=f"soce sweep {parent.run_id[:8]}: jobs, best first (scores 0-1)",
        )
    }
    c.set_tag(parent.run_id, "soce.view", keys["jobs"])
    for r in kept:
        run_id = r.get("mlflow_run_id")
        if not run_id or not find_runs(
            parent.uri, parent.experiment_id, {"mlflow.parentRunId": run_id, "soce.kind": "search_point"}
        ):
            continue
        ws = [mlflow_key(f"w.{m}") for m in r.get("experts") or [m for m, w in r["weights"].items() if w > 0]]
        metric = f"{sel}.overall"
        keys[_label(r)] = save_view(
            parent.uri,
            parent.experiment_id,
            f"soce-points-{run_id}",
            sweep_filter(run_id, "search_point"),
            [column("params", w) for w in ws] + [column("metrics", metric)],
            order_by=column("metrics", metric),
            parallel=(ws, [metric]),
            name=f"soce {_label(r)}: weight search points (scores 0-1)",
        )
        c.set_tag(run_id, "soce.view", keys[_label(r)])
    return keys


def _tag_distinct(c, results: list[dict], kept: list[dict]) -> None:
    """Tag each job run ``soce.distinct`` (true: the run a distinct soup is shown by) and relabel a kept run
    that stands for several jobs (its run name then lists the values, e.g. 'uniform tau=0.3,0.6')."""
    shown = {r.get("mlflow_run_id"): r for r in kept}
    for r in results:
        run_id = r.get("mlflow_run_id")
        if not run_id:
            continue
        c.set_tag(run_id, "soce.distinct", "true" if run_id in shown else "false")
        if run_id in shown and shown[run_id].get("same_soup"):
            label = shown[run_id]["label"]
            c.set_tag(run_id, "mlflow.runName", label[:240])
            c.set_tag(run_id, "soce.label", label[:5000])
