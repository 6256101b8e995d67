"""The paper's analyses for one job, from the job's own evaluations (all cached):

- Shapley values of the candidates, v(S) = selection-split overall of the uniform soup of S (v(empty) = 0);
- consistency: category correlation across the unsouped population vs across the soups of the search;
- emergent solves: on report-split items every ingredient fails, the share the soup solves; and the
  share of each ingredient's solved items the soup keeps.

Enabled by the ``analysis`` config group (``analysis=full``); results go to the job's artifacts, its
MLflow run (tables, figures, ``shapley.*``/``consistency.*``/``emergent.*`` metrics) and result.json.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from soce import analysis

log = logging.getLogger(__name__)




def run_analyses(
    acfg: dict[str, Any],
    *,
    candidates: list[str],
    ingredients: dict[str, float],
    evaluate: Callable[[dict[str, float], str], dict[str, Any]],
    population: pd.DataFrame,
    trace: pd.DataFrame | None,
    categories: list[str],
    select_split: str,
    report_split: str,
    out_dir: Path,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the enabled analyses; write their tables and figures into ``out_dir``.

    Returns (metrics for MLflow, summary for result.json)."""
    metrics: dict[str, float] = {}
    summary: dict[str, Any] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    if acfg.get("shapley"):
        def value(coalition: frozenset[str]) -> float:
            return float(evaluate({n: 1.0 / len(coalition) for n in coalition}, select_split)["overall"])

        res = analysis.shapley_values(candidates, value, 0.0, acfg["shapley_exact_max"],
                                      acfg["shapley_permutations"], acfg["seed"])
        res.to_frame().to_csv(out_dir / "shapley.csv")
        analysis.shapley_figure(res, out_dir / "shapley.png")
        metrics.update({f"shapley.{k}": v for k, v in res.values.items()})
        summary["shapley"] = {"values": res.values, "method": res.method, "evaluations": res.evaluations,
                              "split": select_split}
    if acfg.get("consistency"):
        soups = trace[categories] if trace is not None and set(categories) <= set(trace.columns) else None
        if soups is None or len(soups) < 3:
            log.info("consistency: the job has fewer than 3 searched soups; skipped")
        else:
            res = analysis.consistency(population[categories], soups)
            analysis.consistency_figure(res, out_dir / "consistency.png")
            pd.DataFrame({"mean_r": [res.mean_r_candidates, res.mean_r_soups],
                          "mean_abs_r": [res.mean_abs_r_candidates, res.mean_abs_r_soups]},
                         index=["population", "soups"]).to_csv(out_dir / "consistency.csv")
            metrics.update({"consistency.mean_r_population": res.mean_r_candidates,
                            "consistency.mean_r_soups": res.mean_r_soups})
            summary["consistency"] = {"mean_r_population": res.mean_r_candidates,
                                      "mean_r_soups": res.mean_r_soups, "excluded": list(res.excluded)}
    if acfg.get("emergent") and len(ingredients) > 1:
        soup = evaluate(ingredients, report_split)["samples"]
        per = {n: evaluate({n: 1.0}, report_split)["samples"] for n in ingredients}
        table = analysis.emergent_by_category({c: {n: per[n][c] for n in per} for c in categories},
                                              {c: soup[c] for c in categories})
        table.to_csv(out_dir / "emergent.csv")
        pooled = analysis.emergent_solves({n: sum((per[n][c] for c in categories), []) for n in per},
                                          sum((soup[c] for c in categories), []))
        metrics["emergent.share"] = pooled.share_emergent
        metrics.update({f"emergent.kept.{n}": k.share_kept for n, k in pooled.per_ingredient.items()})
        summary["emergent"] = {"split": report_split, "n_all_fail": pooled.n_all_fail,
                               "n_soup_solves_all_fail": pooled.n_soup_solves_all_fail,
                               "share_emergent": pooled.share_emergent,
                               "share_kept": {n: k.share_kept for n, k in pooled.per_ingredient.items()}}
    return metrics, summary
