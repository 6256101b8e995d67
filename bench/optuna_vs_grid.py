"""TPE (optuna) with 40% of the grid's evaluations vs the paper's full grid, on the demo, over 3 seeds.

    python bench/optuna_vs_grid.py [--seeds 0 1 2] [--fraction 0.4] [extra Hydra overrides ...]

Runs `strategy=soce_weighted search=grid` once and `search=optuna search.n_trials=<fraction x grid>`
for each optuna seed (every evaluation goes through the cache, so grid points are not re-evaluated), then
prints the best selection-split score of each and its gap to the grid's best, in points, and the
report-split score of each chosen soup.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path


def job(out: Path, *overrides: str) -> dict:
    if not (out / "result.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "soce",
                "strategy=soce_weighted",
                f"hydra.run.dir={out}",
                "progress=false",
                *overrides,
            ],
            check=True,
        )
    return json.loads((out / "result.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fraction", type=float, default=0.4)
    ap.add_argument("--out", default="outputs/optuna_vs_grid")
    args, extra = ap.parse_known_args()
    out = Path(args.out).resolve()
    grid = job(out / "grid", "search=grid", *extra)
    sel, rep = grid["select_split"], grid["report_split"]
    from soce.method import weight_grid

    n_grid = len(weight_grid(len(grid["experts"])))
    n_trials = max(1, math.floor(args.fraction * n_grid))
    lines = [
        f"grid: {n_grid} points over {grid['experts']}; optuna: {n_trials} trials "
        f"({100 * n_trials / n_grid:.0f}% of the grid's evaluations)",
        "",
        f"| search | seed | best {sel} overall | gap to grid (points) | {rep} overall of the chosen soup |",
        "|---|---|---|---|---|",
        f"| grid | - | {100 * grid['scores'][sel]['overall']:.2f} | 0.00 | "
        f"{100 * grid['scores'][rep]['overall']:.2f} |",
    ]
    for seed in args.seeds:
        r = job(out / f"optuna{seed}", "search=optuna", f"search.n_trials={n_trials}", f"search.seed={seed}", *extra)
        gap = 100 * (grid["scores"][sel]["overall"] - r["scores"][sel]["overall"])
        lines.append(
            f"| optuna | {seed} | {100 * r['scores'][sel]['overall']:.2f} | {gap:.2f} | "
            f"{100 * r['scores'][rep]['overall']:.2f} |"
        )
    md = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
