"""Sweep mode: the weight search spread over Hydra jobs, so a Hydra launcher can run it in parallel.

    python -m soce.sweep [overrides] [hydra/launcher=joblib hydra.launcher.n_jobs=4]
    python -m soce.collect dir=<sweep dir> [overrides]      # (also run at the end of soce.sweep)

1. selection in this process (candidate and population scores come from the evaluation cache);
2. every grid point over the experts becomes one job of a Hydra multirun (``strategy=fixed``), scored on
   the selection split only, logged as a child run of one MLflow parent (parallel-coordinates ready);
3. collect: the best point on the selection split is re-run as one job that writes the final soup and
   scores it on the report split (``<sweep dir>/final/result.json``).
A sweep interrupted at any point is resumed by the same command: finished points come from the cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from soce import method
from soce.config import ConfigError


def _fmt(ws: tuple[float, ...] | list[float]) -> str:
    return "[" + ",".join(f"{w:g}" for w in ws) + "]"


def point_overrides(experts: list[str], points: list[tuple[float, ...]]) -> list[str]:
    """The multirun overrides that make one job per weight point."""
    return ["strategy=fixed", f"strategy.ingredients=[{','.join(experts)}]",
            "strategy.weights=" + ",".join(_fmt(p) for p in points), "save_soup=false", "report=false"]


def collect(sweep_dir: Path, overrides: list[str]) -> dict:
    """Pick the best point of a sweep on the selection split; run it as the final job; return its result."""
    results = [json.loads(f.read_text()) for f in sorted(sweep_dir.glob("*/result.json")) if f.parent.name != "final"]
    if not results:
        raise SystemExit(f"soce.collect: no finished point in {sweep_dir}")
    split = results[0]["select_split"]
    best = max(results, key=lambda r: r["scores"][split]["overall"])  # ties: the earlier job
    names = [n for n, w in best["weights"].items() if w > 0]
    cmd = [sys.executable, "-m", "soce", "strategy=fixed", f"strategy.ingredients=[{','.join(names)}]",
           f"strategy.weights={_fmt([best['weights'][n] for n in names])}", f"hydra.run.dir={sweep_dir / 'final'}",
           *[o for o in overrides if not o.startswith(("hydra/launcher", "hydra.launcher", "hydra.sweep"))]]
    subprocess.run(cmd, check=True)
    final = json.loads((sweep_dir / "final" / "result.json").read_text())
    print(f"soce.collect: best of {len(results)} points on {split}: "
          + ", ".join(f"{n} {w:.2f}" for n, w in final["weights"].items() if w > 0)
          + f" -> {split} {100 * best['scores'][split]['overall']:.2f}%, "
          + ", ".join(f"{s} {100 * v['overall']:.2f}%" for s, v in final["scores"].items() if s != split))
    return final


def main(argv: list[str] | None = None) -> int:
    from soce.job.inputs import gather
    from soce.job.pipeline import select_experts
    from soce.job.preflight import compose_config, preflight

    args = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in args if not a.startswith("-")]
    job_args = [o for o in overrides if not o.startswith(("hydra/", "hydra."))]
    problem = preflight(job_args)
    if problem:
        print(f"soce.sweep: error: {problem}", file=sys.stderr)
        return 2
    config = compose_config(job_args)
    if config.pool.source == "csv":
        print("soce.sweep: error: a sweep evaluates soups; pool.source=csv has no checkpoints", file=sys.stderr)
        return 2
    if config.search.name != "grid":
        print(f"soce.sweep: error: soce.sweep spreads the grid over jobs; search={config.search.name} runs in "
              f"one job: python -m soce strategy=soce_weighted search={config.search.name}", file=sys.stderr)
        return 2
    try:
        experts = select_experts(config, gather(config)).ingredients
        s = config.search
        points = method.weight_grid(len(experts), s.step, s.min_weight, s.include_uniform)
    except (ConfigError, method.SelectionError) as e:
        print(f"soce.sweep: error: {e}", file=sys.stderr)
        return 2
    sweep_dir = next((Path(o.split("=", 1)[1]) for o in overrides if o.startswith("hydra.sweep.dir=")),
                     Path(config.paths.output_dir) / "sweeps" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    print(f"soce.sweep: experts {experts}; {len(points)} points -> {sweep_dir}")
    extra = [o for o in overrides if not o.startswith("hydra.sweep.dir=")]
    cmd = [sys.executable, "-m", "soce", "-m", *point_overrides(experts, points), f"hydra.sweep.dir={sweep_dir}",
           "hydra.sweep.subdir=${hydra.job.num}", *extra]
    subprocess.run(cmd, check=True)
    collect(sweep_dir, job_args)
    return 0


def collect_main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    kv = dict(a.split("=", 1) for a in args if a.startswith("dir="))
    if "dir" not in kv:
        print("usage: python -m soce.collect dir=<sweep dir> [overrides]", file=sys.stderr)
        return 2
    collect(Path(kv["dir"]), [a for a in args if not a.startswith("dir=")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
