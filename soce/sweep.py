"""Sweep mode: the weight search spread over Hydra jobs, so a Hydra launcher can run it in parallel.

    python -m soce.sweep [overrides] [hydra/launcher=joblib hydra.launcher.n_jobs=4]
    python -m soce.collect dir=<sweep dir> [partial=true] [overrides]   # (also run at the end of soce.sweep)

1. selection in this process (candidate and population scores come from the evaluation cache);
2. every grid point over the experts becomes one job of a Hydra multirun (``strategy=fixed``), scored on
   the selection split only, logged as a child run of one MLflow parent (parallel-coordinates ready);
3. collect: the best point on the selection split is re-run as one job that writes the final soup and
   scores it on the report split (``<sweep dir>/final/result.json``). An unfinished sweep (points listed
   in ``<sweep dir>/points.json`` without a result) is refused, naming how many are missing, unless
   ``partial=true``.
A sweep interrupted at any point is resumed by the same command: finished points come from the cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def _fmt(ws: tuple[float, ...] | list[float]) -> str:
    return "[" + ",".join(f"{w:g}" for w in ws) + "]"


def point_overrides(experts: list[str], points: list[tuple[float, ...]]) -> list[str]:
    """The multirun overrides that make one job per weight point."""
    return [
        "strategy=fixed",
        f"strategy.ingredients=[{','.join(experts)}]",
        "strategy.weights=" + ",".join(_fmt(p) for p in points),
        "save_soup=false",
        "report=false",
    ]


class CollectError(ValueError):
    """A sweep that cannot be collected; ``str(e)`` is one line."""


POINTS = "points.json"  # in a sweep dir: the experts and every weight point the sweep launches


def missing_points(sweep_dir: Path, finished: int) -> int:
    """How many points of the sweep have no result yet (from ``points.json``; without it, the point folders
    Hydra made that hold no ``result.json``)."""
    listed = sweep_dir / POINTS
    if listed.is_file():
        return max(0, len(json.loads(listed.read_text())["points"]) - finished)
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()] if sweep_dir.is_dir() else []
    return sum(not (d / "result.json").is_file() for d in dirs)


def collect(sweep_dir: Path, overrides: list[str], partial: bool = False) -> dict:
    """Pick the best point of a sweep on the selection split; run it as the final job; return its result.
    CollectError (one line) when no point finished, or when some did not and ``partial`` is false."""
    results = [json.loads(f.read_text()) for f in sorted(sweep_dir.glob("*/result.json")) if f.parent.name != "final"]
    if not results:
        raise CollectError(f"no finished point in {sweep_dir}")
    missing = missing_points(sweep_dir, len(results))
    if missing and not partial:
        raise CollectError(
            f"sweep {sweep_dir} is unfinished: {missing} of "
            f"{missing + len(results)} points have no result (run the same soce.sweep command to "
            "finish it, or collect the finished ones with partial=true)"
        )
    split = results[0]["select_split"]
    best = max(results, key=lambda r: r["scores"][split]["overall"])  # ties: the earlier job
    names = [n for n, w in best["weights"].items() if w > 0]
    cmd = [
        sys.executable,
        "-m",
        "soce",
        "strategy=fixed",
        f"strategy.ingredients=[{','.join(names)}]",
        f"strategy.weights={_fmt([best['weights'][n] for n in names])}",
        f"hydra.run.dir={sweep_dir / 'final'}",
        *[o for o in overrides if not o.startswith(("hydra/launcher", "hydra.launcher", "hydra.sweep"))],
    ]
    subprocess.run(cmd, check=True)
    final = json.loads((sweep_dir / "final" / "result.json").read_text())
    print(
        f"soce.collect: best of {len(results)} points{f' ({missing} missing)' if missing else ''} on {split}: "
        + ", ".join(f"{n} {w:.2f}" for n, w in final["weights"].items() if w > 0)
        + f" -> {split} {100 * best['scores'][split]['overall']:.2f}%, "
        + ", ".join(f"{s} {100 * v['overall']:.2f}%" for s, v in final["scores"].items() if s != split)
    )
    return final


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    from soce import method
    from soce.config import ConfigError
    from soce.job.inputs import gather
    from soce.job.pipeline import select_experts
    from soce.job.preflight import compose_config, preflight

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
        print(
            f"soce.sweep: error: soce.sweep spreads the grid over jobs; search={config.search.name} runs in "
            f"one job: python -m soce strategy=soce_weighted search={config.search.name}",
            file=sys.stderr,
        )
        return 2
    try:
        experts = select_experts(config, gather(config)).ingredients
        s = config.search
        points = method.weight_grid(len(experts), s.step, s.min_weight, s.include_uniform)
    except (ConfigError, method.SelectionError) as e:
        print(f"soce.sweep: error: {e}", file=sys.stderr)
        return 2
    sweep_dir = next(
        (Path(o.split("=", 1)[1]) for o in overrides if o.startswith("hydra.sweep.dir=")),
        Path(config.paths.output_dir) / "sweeps" / time.strftime("%Y-%m-%d_%H-%M-%S"),
    )
    print(f"soce.sweep: experts {experts}; {len(points)} points -> {sweep_dir}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / POINTS).write_text(json.dumps({"experts": experts, "points": [list(p) for p in points]}))
    extra = [o for o in overrides if not o.startswith("hydra.sweep.dir=")]
    cmd = [
        sys.executable,
        "-m",
        "soce",
        "-m",
        *point_overrides(experts, points),
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=${hydra.job.num}",
        *extra,
    ]
    subprocess.run(cmd, check=True)
    try:
        collect(sweep_dir, job_args)
    except CollectError as e:
        print(f"soce.collect: error: {e}", file=sys.stderr)
        return 2
    return 0


COLLECT_USAGE = (
    "usage: python -m soce.collect dir=<sweep dir> [partial=true] [overrides]\n"
    "Re-runs the best point of a soce.sweep on the selection split as the final soup and scores it on "
    "the report split\n(<sweep dir>/final/result.json). An unfinished sweep is refused unless "
    "partial=true."
)


def collect_main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(COLLECT_USAGE)
        return 0
    kv = dict(a.split("=", 1) for a in args if a.startswith(("dir=", "partial=")))
    if "dir" not in kv:
        print(COLLECT_USAGE, file=sys.stderr)
        return 2
    partial = kv.get("partial", "false").lower() in ("true", "1", "yes")
    try:
        collect(Path(kv["dir"]), [a for a in args if not a.startswith(("dir=", "partial="))], partial)
    except CollectError as e:
        print(f"soce.collect: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
