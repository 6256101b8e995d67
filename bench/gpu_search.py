"""GPU path of a SoCE weight search, measured: per-point in-memory re-mix time vs per-point lm-eval time.

    python bench/gpu_search.py [--preset gpu] [--seed 0] [--max-experts 3] [--out DIR] [--scale 8b]

Builds the demo zoo (``gpu`` preset: trained on the GPU), scores candidates and population on the
selection split with lm-eval (batched, in process), selects experts, then runs the paper's grid with the
experts resident on the GPU: each point is one ``Remixer.mix`` (timed with CUDA synchronisation) and one
lm-eval evaluation (timed). Prints the medians and their ratio, and the demo's report-split table
(uniform / soce_selected / soce_weighted / best single). No Hydra, no MLflow: only what the search does.

``--scale 8b`` also times search points at Llama-3.1-8B shapes (bench/gpu_remix.py's random bf16 experts,
3 resident on the GPU, the demo's tokenizer): re-mix + lm-eval on the same dev split, ``--scale-points`` of
them. The scores are meaningless (random weights); the times are those of an 8B soup on this benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pandas as pd
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-experts", type=int, default=3)
    ap.add_argument("--root", default="/tmp/soce-demo")
    ap.add_argument("--out", default=".")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--scale", choices=["8b", "1b", "tiny"], default=None)
    ap.add_argument("--scale-points", type=int, default=3)
    ap.add_argument("--scale-batch-size", type=int, default=32)
    ap.add_argument("--scale-workdir", default="/tmp/soce-scale")
    args = ap.parse_args()

    import tempfile

    from soce import method
    from soce.benchmarks.lmeval import quiet_lm_eval
    from soce.benchmarks.scores import ScoreCache
    from soce.config import SelectionConfig
    from soce.demo.zoo import DemoConfig, build_demo
    from soce.search.evaluator import SoupEvaluator
    from soce.search.selections import select

    quiet_lm_eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.time()
    man = build_demo(DemoConfig(seed=args.seed, preset=args.preset, root=args.root), progress=False)
    build_s = time.time() - t
    ev = demo_evaluator(man, args.batch_size, device)
    bench = ev.benchmark
    cands, pop = man["candidates"], man["population"]
    # the in-memory merge evaluator soce's jobs use, over an empty cache: every evaluation below is real
    soups = SoupEvaluator({**pop, **cands}, list(cands), ev, ScoreCache(Path(tempfile.mkdtemp())), device)

    t = time.time()
    cand = {s: {n: soups.scores({n: 1.0}, s) for n in cands} for s in ("dev", "test")}
    pop_dev = {n: soups.scores({n: 1.0}, "dev") for n in pop}
    scoring_s = time.time() - t
    print(
        f"built zoo in {build_s:.0f} s, scored {len(cands)} candidates + {len(pop)} population in {scoring_s:.0f} s",
        flush=True,
    )
    cats = bench.categories
    cand_table = pd.DataFrame(cand["dev"]).T[cats]
    pop_table = pd.concat([pd.DataFrame(pop_dev).T[cats], cand_table])
    sel = select(pop_table, cand_table, SelectionConfig(tau=0.5, max_experts=args.max_experts))
    experts = sel.ingredients

    def evaluate(weights: dict[str, float], split: str = "dev") -> dict:
        return {c: soups.scores(weights, split)[c] for c in cats}

    def on_point(i: int, weights: dict, scores: dict) -> None:
        ms, es = (1000 * x for x in soups.timings[-1])
        print(f"point {i + 1}: re-mix {ms:.2f} ms, lm-eval {es:.0f} ms", flush=True)

    points = method.weight_grid(len(experts))
    res = method.search_weights(experts, points, evaluate, on_point)
    mix_s, eval_s = [t[0] for t in soups.timings], [t[1] for t in soups.timings]
    tok, rm = soups.tokenizer(), soups._remixer
    uniform_all = {n: 1 / len(cands) for n in cands}
    selected = {n: 1 / len(experts) for n in experts}
    best = cand_table.mean(axis=1).idxmax()
    rows = {
        "uniform": evaluate(uniform_all, "test"),
        "soce_selected": evaluate(selected, "test"),
        "soce_weighted": evaluate(res.weights, "test"),
        f"best single ({best})": {c: cand["test"][best][c] for c in cats},
    }
    table = (100 * pd.DataFrame(rows).T[cats]).round(2)
    table["overall"] = table[cats].mean(axis=1).round(2)
    mm, me = statistics.median(mix_s), statistics.median(eval_s)
    params = sum(p.numel() for p in rm.model.parameters())
    summary = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "preset": args.preset,
        "seed": args.seed,
        "params": params,
        "build_s": round(build_s, 1),
        "scoring_s": round(scoring_s, 1),
        "experts": experts,
        "weak_set": sel.weak,
        "points": len(points),
        "weights": res.weights,
        "mix_s_median": mm,
        "eval_s_median": me,
        "mix_over_eval": mm / me,
        "table_test": table.to_dict(orient="index"),
    }
    if args.scale:
        del rm
        soups._remixer = None  # free the demo experts before the 8B-shape ones
        torch.cuda.empty_cache() if device == "cuda" else None
        summary["scale"] = scale_points(args, man, tok, device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"gpu_search_{args.preset}_seed{args.seed}.json").write_text(json.dumps(summary, indent=2))
    print(table.to_string())
    print(
        f"\n{summary['device']}: {params / 1e6:.1f}M params, build {build_s:.0f} s, scoring {scoring_s:.0f} s; "
        f"{len(points)} grid points over {experts}"
    )
    print(
        f"per point: re-mix {1000 * mm:.2f} ms (median), lm-eval {1000 * me:.0f} ms (median); "
        f"re-mix / evaluation = {100 * mm / me:.3f}%"
    )
    if args.scale:
        sc = summary["scale"]
        print(
            f"at {args.scale} shapes ({sc['params'] / 1e9:.2f}B params, {sc['experts']} experts resident): re-mix "
            f"{1000 * sc['mix_s_median']:.0f} ms, lm-eval {1000 * sc['eval_s_median']:.0f} ms per point; "
            f"re-mix / evaluation = {100 * sc['mix_over_eval']:.2f}%"
        )


def demo_evaluator(man: dict, batch_size: int, device: str):
    """An lm-eval Evaluator over the demo benchmark described by the zoo manifest ``man``."""
    from soce.benchmarks.lmeval import Benchmark, Evaluator

    bench = Benchmark(
        name="demo",
        categories=man["categories"],
        task=man["task_template"],
        task_dir=man["task_dir"],
        batch_size=batch_size,
    )
    return Evaluator(bench, device)


def scale_points(args: argparse.Namespace, man: dict, tok, device: str) -> dict:
    """Re-mix + evaluate ``args.scale_points`` points of 3 random experts at ``args.scale`` shapes."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_remix import SHAPES, build

    from soce.soup import Remixer

    dev = torch.device(device)
    dirs = build(Path(args.scale_workdir), SHAPES[args.scale], 3, 2 if args.scale == "8b" else 3, 5 * 10**9, dev)
    rm = Remixer({d.name: d for d in dirs}, device=device)
    ev = demo_evaluator(man, args.scale_batch_size, device)
    mix_s, eval_s = [], []
    points = [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [1 / 3] * 3, [0.3, 0.2, 0.5], [0.6, 0.2, 0.2]]
    for i in range(args.scale_points + 1):  # the first point warms kernels and lm-eval up: not counted
        w = dict(zip(rm.names, points[i % len(points)], strict=True))
        torch.cuda.synchronize() if device == "cuda" else None
        t0 = time.perf_counter()
        model = rm.mix(w)
        torch.cuda.synchronize() if device == "cuda" else None
        t1 = time.perf_counter()
        ev.score(model, tok, "dev", log_samples=False)
        t2 = time.perf_counter()
        print(
            f"{args.scale} point {i}{' (warm-up)' if i == 0 else ''}: re-mix {1000 * (t1 - t0):.0f} ms, "
            f"lm-eval {1000 * (t2 - t1):.0f} ms",
            flush=True,
        )
        if i:
            mix_s.append(t1 - t0)
            eval_s.append(t2 - t1)
    mm, me = statistics.median(mix_s), statistics.median(eval_s)
    return {
        "shape": args.scale,
        "params": sum(p.numel() for p in rm.model.parameters()),
        "experts": 3,
        "batch_size": args.scale_batch_size,
        "mix_s": mix_s,
        "eval_s": eval_s,
        "mix_s_median": mm,
        "eval_s_median": me,
        "mix_over_eval": mm / me,
    }


if __name__ == "__main__":
    main()
