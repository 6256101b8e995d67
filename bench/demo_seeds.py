"""The demo's evidence over several zoo seeds: `make run`'s three strategies per seed, report split.

    python bench/demo_seeds.py [--seeds 0 1 2] [--preset cpu] [extra Hydra overrides ...]

Per seed: a Hydra multirun (uniform, soce_selected, soce_weighted) on the demo zoo of that seed, then
the overall accuracy on the report split of each strategy and of the best single candidate (picked on the
selection split), with binomial standard errors (per category sqrt(p(1-p)/n), combined over categories);
then the mean over seeds with the standard error across seeds, and which orderings hold in each seed.
Writes outputs/demo_seeds/summary.md (and .json) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

STRATEGIES = ("uniform", "soce_selected", "soce_weighted")


def overall_se(scores: dict[str, float], categories: list[str], n_items: int) -> float:
    """Standard error (points) of the mean over categories of per-category accuracies on n_items each."""
    var = sum(scores[c] * (1 - scores[c]) / n_items for c in categories)
    return 100 * math.sqrt(var) / len(categories)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--out", default="outputs/demo_seeds")
    ap.add_argument("--test-items", type=int, default=None, help="items per category in the report split")
    args, extra = ap.parse_known_args()
    out = Path(args.out).resolve()
    rows, per_seed = [], {}
    for seed in args.seeds:
        sweep = out / f"seed{seed}"
        if not all((sweep / f"{i}_{s}" / "result.json").exists() for i, s in enumerate(STRATEGIES)):
            cmd = [
                sys.executable,
                "-m",
                "soce",
                "-m",
                f"strategy={','.join(STRATEGIES)}",
                f"demo.seed={seed}",
                f"demo.preset={args.preset}",
                f"hydra.sweep.dir={sweep}",
                "progress=false",
                *extra,
            ]
            subprocess.run(cmd, check=True)
        results = {s: json.loads((sweep / f"{i}_{s}" / "result.json").read_text()) for i, s in enumerate(STRATEGIES)}
        first = results["uniform"]
        split, cats = first["report_split"], first["categories"]
        manifest = out.parent / "demo" / f"{args.preset}-seed{seed}" / "manifest.json"  # default paths
        n = args.test_items or (json.loads(manifest.read_text())["sizes"][split] if manifest.exists() else 500)
        best = first["best_single"]
        entries = {s: r["scores"][split] for s, r in results.items()}
        entries["best single"] = first["candidate_scores"][best][split]
        per_seed[seed] = {k: (100 * v["overall"], overall_se(v, cats, n)) for k, v in entries.items()}
        per_seed[seed]["_best"] = best
        rows.append(seed)
    names = [*STRATEGIES, "best single"]
    lines = [
        "| seed | " + " | ".join(names) + " | weighted > best single > uniform | selected >= uniform |",
        "|---" * (len(names) + 3) + "|",
    ]
    for seed in rows:
        d = per_seed[seed]
        o = {k: d[k][0] for k in names}
        chain = o["soce_weighted"] > o["best single"] > o["uniform"]
        lines.append(
            f"| {seed} | "
            + " | ".join(f"{d[k][0]:.2f} ± {d[k][1]:.2f}" for k in names)
            + f" | {'yes' if chain else 'no'} | {'yes' if o['soce_selected'] >= o['uniform'] else 'no'} |"
        )
    means = {k: sum(per_seed[s][k][0] for s in rows) / len(rows) for k in names}
    k_ = len(rows)
    sems = {
        k: (
            math.sqrt(sum((per_seed[s][k][0] - means[k]) ** 2 for s in rows) / (k_ - 1) / k_)
            if k_ > 1
            else float("nan")
        )
        for k in names
    }
    lines.append(
        "| mean ± s.e. over seeds | " + " | ".join(f"{means[k]:.2f} ± {sems[k]:.2f}" for k in names) + " | | |"
    )
    md = (
        f"Overall accuracy (%) on the report split, demo preset `{args.preset}`, per seed ± binomial s.e.; "
        "best single = best candidate on the selection split ("
        + ", ".join(str(per_seed[s]["_best"]) for s in rows)
        + ").\n\n"
        + "\n".join(lines)
        + "\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps({str(k): v for k, v in per_seed.items()}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
