"""The demo's evidence over zoo seeds: `make run`'s three strategies per seed and merge operator, report split.

    python bench/demo_seeds.py [--seeds 0 1 2] [--preset cpu] [--merges linear ties] [extra Hydra overrides ...]

Per seed: one Hydra multirun (uniform, soce_selected, soce_weighted x the merge operators) on the demo zoo of
that seed, then the overall accuracy on the report split of each (operator, strategy) and of the best single
candidate (picked on the selection split), with binomial standard errors (per category sqrt(p(1-p)/n),
combined over categories); then per operator the mean over seeds with the standard error across seeds, and
which orderings hold in each seed. Writes outputs/demo_seeds/summary.md (and .json) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

STRATEGIES = ("uniform", "soce_selected", "soce_weighted")
COLUMNS = (*STRATEGIES, "best single")


def overall_se(scores: dict[str, float], categories: list[str], n_items: int) -> float:
    """Standard error (points) of the mean over categories of per-category accuracies on n_items each."""
    var = sum(scores[c] * (1 - scores[c]) / n_items for c in categories)
    return 100 * math.sqrt(var) / len(categories)


def run_seed(seed: int, merges: list[str], preset: str, sweep: Path, extra: list[str]) -> dict[tuple[str, str], dict]:
    """The results of one seed's sweep, by (operator, strategy); runs the sweep unless all are there."""

    def found() -> dict[tuple[str, str], dict]:
        res = [json.loads(p.read_text()) for p in sweep.glob("*/result.json")]
        return {(r.get("merge", {}).get("method", "linear"), r["strategy"]): r for r in res}

    want = {(m, s) for m in merges for s in STRATEGIES}
    if not want <= found().keys():
        cmd = [sys.executable, "-m", "soce", "-m", f"strategy={','.join(STRATEGIES)}", f"merge={','.join(merges)}"]
        cmd += [f"demo.seed={seed}", f"demo.preset={preset}", f"hydra.sweep.dir={sweep}", "progress=false", *extra]
        subprocess.run(cmd, check=True)
    return {k: v for k, v in found().items() if k in want}


def seed_rows(results: dict[tuple[str, str], dict], n_items: int | None, manifest: Path) -> dict[str, dict]:
    """Per operator: column -> (overall %, s.e.), plus the best single candidate's name under ``_best``."""
    first = next(iter(results.values()))
    split, cats = first["report_split"], first["categories"]
    n = n_items or (json.loads(manifest.read_text())["sizes"][split] if manifest.exists() else 500)
    best = first["best_single"]
    b = first["candidate_scores"][best][split]
    single = (100 * b["overall"], overall_se(b, cats, n))
    rows: dict[str, dict] = {}
    for (merge, strategy), r in sorted(results.items()):
        row = rows.setdefault(merge, {"_best": best, "best single": single})
        v = r["scores"][split]
        row[strategy] = (100 * v["overall"], overall_se(v, cats, n))
    return rows


def table(per_seed: dict[int, dict[str, dict]], merges: list[str]) -> list[str]:
    lines = [
        "| operator | seed | " + " | ".join(COLUMNS) + " | weighted > best single > uniform | selected >= uniform |",
        "|---" * (len(COLUMNS) + 4) + "|",
    ]
    for merge in merges:
        seeds = [s for s in per_seed if merge in per_seed[s]]
        for seed in seeds:
            d = per_seed[seed][merge]
            o = {k: d[k][0] for k in COLUMNS}
            chain = o["soce_weighted"] > o["best single"] > o["uniform"]
            lines.append(
                f"| {merge} | {seed} | "
                + " | ".join(f"{d[k][0]:.2f} ± {d[k][1]:.2f}" for k in COLUMNS)
                + f" | {'yes' if chain else 'no'} | {'yes' if o['soce_selected'] >= o['uniform'] else 'no'} |"
            )
        means = {k: sum(per_seed[s][merge][k][0] for s in seeds) / len(seeds) for k in COLUMNS}
        sems = {
            k: math.sqrt(sum((per_seed[s][merge][k][0] - means[k]) ** 2 for s in seeds) / (len(seeds) - 1) / len(seeds))
            if len(seeds) > 1
            else float("nan")
            for k in COLUMNS
        }
        lines.append(
            f"| {merge} | mean ± s.e. over seeds | "
            + " | ".join(f"{means[k]:.2f} ± {sems[k]:.2f}" for k in COLUMNS)
            + " | | |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--merges", nargs="+", default=["linear"], help="merge operators (conf/merge), swept per seed")
    ap.add_argument("--out", default="outputs/demo_seeds")
    ap.add_argument("--test-items", type=int, default=None, help="items per category in the report split")
    args, extra = ap.parse_known_args()
    out = Path(args.out).resolve()
    per_seed = {}
    for seed in args.seeds:
        results = run_seed(seed, args.merges, args.preset, out / f"seed{seed}", extra)
        manifest = out.parent / "demo" / f"{args.preset}-seed{seed}" / "manifest.json"  # default paths
        per_seed[seed] = seed_rows(results, args.test_items, manifest)
    best = ", ".join(str(next(iter(per_seed[s].values()))["_best"]) for s in per_seed)
    md = (
        f"Overall accuracy (%) on the report split, demo preset `{args.preset}`, per seed ± binomial s.e.; "
        f"best single = best candidate on the selection split ({best}).\n\n"
        + "\n".join(table(per_seed, args.merges))
        + "\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps({str(s): rows for s, rows in per_seed.items()}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
