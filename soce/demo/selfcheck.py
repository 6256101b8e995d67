"""Fast self-check of the demo zoo: do SoCE's orderings show up on the held-out test split?

``python -m soce.demo.selfcheck [--preset cpu] [--seed 0] [--root outputs/demo]`` builds (or reuses) the
zoo and prints, with a direct batched forward pass (greedy exact match, no lm-eval):

- per-category test accuracy of the base and every candidate;
- category correlations over the population (families should show as blocks);
- soups: uniform of all candidates, uniform of the dev-selected experts, SoCE's weight grid on dev;
- linear connectivity: accuracy at the midpoint of every pair of candidates vs. their mean.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from soce.config import DemoConfig
from soce.demo import tasks
from soce.demo.train import average_state, quick_scores, set_threads
from soce.demo.zoo import build_demo

Scores = dict[str, float]


def paper_grid(n: int) -> list[tuple[float, ...]]:
    """Weight vectors with entries in {0.1, ..., 0.9} summing to 1, plus the uniform point (n >= 2)."""
    if n == 1:
        return [(1.0,)]
    pts = [tuple(k / 10 for k in ks) for ks in itertools.product(range(1, 10), repeat=n) if sum(ks) == 10]
    return pts + [tuple([1.0 / n] * n)]


def mean(s: Mapping[str, float]) -> float:
    return sum(s.values()) / len(s)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else 0.0


def select_experts(dev: Mapping[str, Scores], categories: Sequence[str]) -> list[str]:
    """Distinct per-category argmax on dev (ties broken by the higher dev mean, then by name)."""
    experts: list[str] = []
    for c in categories:
        best = max(dev, key=lambda m: (dev[m][c], mean(dev[m]), m))
        if best not in experts:
            experts.append(best)
    return experts


def soup_report(
    states: Mapping[str, Mapping[str, torch.Tensor]],
    score: Callable[[Mapping[str, torch.Tensor], str], Scores],
    categories: Sequence[str],
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Compare best single / uniform all / uniform experts / grid-weighted experts; returns test means.
    ``score(state, split)`` evaluates one state dict on ``split``."""
    names = list(states)
    dev = {n: score(states[n], "dev") for n in names}
    test = {n: score(states[n], "test") for n in names}
    best = max(names, key=lambda n: mean(dev[n]))
    experts = select_experts(dev, categories)
    uni_all = average_state([states[n] for n in names], [1 / len(names)] * len(names))
    uni_exp = average_state([states[n] for n in experts], [1 / len(experts)] * len(experts))
    grid = []
    for w in paper_grid(len(experts)):
        s = average_state([states[n] for n in experts], w)
        grid.append((mean(score(s, "dev")), w, s))
    dev_best, w_best, weighted = max(grid, key=lambda g: g[0])
    res = {
        "best_single": mean(test[best]),
        "oracle_single": max(mean(t) for t in test.values()),
        "uniform_all": mean(score(uni_all, "test")),
        "uniform_experts": mean(score(uni_exp, "test")),
        "weighted_experts": mean(score(weighted, "test")),
    }
    log(f"best single on dev: {best}; experts: {experts}; weights {w_best} (dev {100 * dev_best:.2f})")
    log("  ".join(f"{k} {100 * v:.2f}" for k, v in res.items()))
    return res


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default="outputs/demo")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    args = ap.parse_args(argv)
    set_threads(1)
    manifest = build_demo(DemoConfig(seed=args.seed, preset=args.preset, root=args.root, device=args.device))
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    cats = manifest["categories"]
    data = Path(manifest["dir"]) / "data"
    items = {s: {c: tasks.read_items(data / f"{c}_{s}.jsonl") for c in cats} for s in manifest["splits"]}
    model = LlamaForCausalLM.from_pretrained(manifest["base"], dtype=torch.float32).to(device)

    def load(path: str) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in load_file(str(Path(path) / "model.safetensors")).items()}

    def score(state: Mapping[str, torch.Tensor], split: str) -> Scores:
        model.load_state_dict(state)
        return quick_scores(model, items[split])

    print(report_zoo(manifest, load, score))


def report_zoo(
    manifest: Mapping,
    load: Callable[[str], Mapping[str, torch.Tensor]],
    score: Callable[[Mapping[str, torch.Tensor], str], Scores],
) -> str:
    """The full self-check as text (see the module docstring)."""
    lines: list[str] = []
    cats = manifest["categories"]
    cands = {n: load(p) for n, p in manifest["candidates"].items()}
    rows = {"base": score(load(manifest["base"]), "test")} | {n: score(s, "test") for n, s in cands.items()}
    lines.append("test accuracy %  " + " ".join(f"{c:>6}" for c in cats) + "    mean")
    for n, s in rows.items():
        lines.append(f"{n:16} " + " ".join(f"{100 * s[c]:6.1f}" for c in cats) + f"  {100 * mean(s):6.2f}")
    pop = [score(load(p), "dev") for p in manifest["population"].values()]
    lines.append(f"category correlation over the population ({len(pop)} checkpoints, dev):")
    for a in cats:
        lines.append(f"{a:8} " + " ".join(f"{pearson([s[a] for s in pop], [s[b] for s in pop]):5.2f}" for b in cats))
    soup_report(cands, score, cats, log=lines.append)
    names = list(cands)
    experts = select_experts({n: score(cands[n], "dev") for n in names}, cats)
    dips = []
    for a, b in itertools.combinations(names, 2):
        mid = mean(score(average_state([cands[a], cands[b]], [0.5, 0.5]), "test"))
        dips.append((mid - (mean(rows[a]) + mean(rows[b])) / 2, a, b))
    for label, pool in (("all pairs", dips), ("expert pairs", [d for d in dips if {d[1], d[2]} <= set(experts)])):
        if pool:
            gap, a, b = min(pool)
            lines.append(f"linear connectivity, {label}: worst midpoint - endpoint mean = {100 * gap:+.2f} ({a}, {b})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
