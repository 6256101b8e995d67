"""Sharded re-mix and points across devices: timings for 70B soups (issue 15).

    python3 bench/sharded_remix.py --tiny                         # seconds, on a CPU (a test runs it)
    python3 bench/sharded_remix.py --shape 70b --layers 4         # one H200: a layer-truncated Llama-3.1-70B

Sections (``--sections``, default all):

* ``single``: no device map (today's path): the live model and the experts on one device, fused kernel;
  re-mix time, bits of the live model vs the CPU reference, forward throughput.
* ``sharded``: the live model split by a device map: the embeddings and the first half of the layers on the
  device, the rest (and norm, lm_head) on ``cpu`` (accelerate offloads those modules: they run on the GPU with
  their weights copied in at each forward); once with the experts beside their shard (``with_shard``) and once
  in pinned host memory streamed per tensor (``host``). On a CPU-only machine every entry is ``cpu`` (distinct
  shards, one device). ``--map auto``: instead, transformers' balanced map over every visible GPU (a multi-GPU
  node: each GPU re-mixes its shard concurrently). Same figures as ``single``.
* ``parallel``: ``--workers`` workers, worker i on device ``i % visible GPUs`` (or the CPU), each with its own
  Remixer + live model; ``--points`` points evaluated serially (worker 0), then by all workers as threads and
  as spawned processes (:mod:`soce.search.parallel`); wall times, speed-up, results identical to serial. With one GPU,
  workers share it: that is NOT a multi-GPU speed-up measurement, only what one GPU gives.

Evaluation proxy: one forward pass over a fixed random batch (``--batch`` x ``--seq`` tokens), plus
``--python-ms`` of GIL-holding pure-Python work per point (a stand-in for lm-eval's Python side: request
building, tokenisation, metrics; calibrated once, a fixed amount of work). Not lm-eval itself.

Projection: 70B has 80 layers; ``--layers N`` builds the first N (plus embeddings and lm_head). ``*_full_proj``
fields scale a truncated measurement by bytes (re-mix: memory-bound) or parameters (forward) to 80 layers:
a linear PROJECTION, not a measurement. Experts: ``--distinct`` random ones, the rest hard links (disk space).
The last line printed is a JSON summary (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_remix import build, config  # noqa: E402
from merge_bench import llama_shapes  # noqa: E402

from soce.search import parallel  # noqa: E402
from soce.soup import Remixer, SoupError, reference_soup  # noqa: E402
from soce.soup.placement import live_tensors  # noqa: E402

SHAPES = {
    "70b": dict(layers=80, hidden=8192, inter=28672, vocab=128256, heads=64, kv=8),  # Llama-3.1-70B
    "8b": dict(layers=32, hidden=4096, inter=14336, vocab=128256, heads=32, kv=8),  # Llama-3.1-8B
    "tiny": dict(layers=4, hidden=128, inter=256, vocab=512, heads=4, kv=2),
}


def n_params(shape: dict) -> int:
    return sum(int(torch.Size(s).numel()) for s in llama_shapes(config(shape)).values())


def sync_all() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def time_mixes(rmx: Remixer, names: list[str], repeats: int) -> dict:
    """Median/min seconds of ``repeats`` re-mixes (rotating weights), after one warm-up; synchronised."""
    ws = [0.5, 0.3, 0.2, 0.1][: len(names)]
    times = []
    for r in range(repeats + 1):
        w = {n: ws[(i + r) % len(ws)] for i, n in enumerate(names)}
        sync_all()
        t = time.perf_counter()
        rmx.mix(w)
        rmx.synchronize()
        if r:
            times.append(time.perf_counter() - t)
    return {"median": round(statistics.median(times), 5), "min": round(min(times), 5)}


def forward_rate(model, ids: torch.Tensor, repeats: int) -> dict:
    """Seconds per forward pass over ``ids`` (median after a warm-up) and tokens per second."""
    times = []
    with torch.no_grad():
        for r in range(repeats + 1):
            sync_all()
            t = time.perf_counter()
            model(ids).logits[:, -1].float().cpu()
            if r:
                times.append(time.perf_counter() - t)
    s = statistics.median(times)
    return {"forward_s": round(s, 5), "tokens_per_s": round(ids.numel() / s, 1)}


def bit_check(rmx: Remixer, models: dict[str, Path], weights: dict[str, float], keys: list[str] | None) -> dict:
    """Differing elements, per checked key, between the live model and the CPU reference soup (``keys``:
    None = every tensor)."""
    from safetensors import safe_open

    rmx.mix(weights)
    rmx.synchronize()
    keys = keys or list(rmx.targets)
    live = live_tensors(rmx.model)
    bad = {}
    for key in keys:
        srcs = []
        for c in rmx.ckpts:
            with safe_open(c.tensors[key].file, "pt") as f:
                srcs.append(f.get_tensor(key))
        ref = reference_soup(srcs, [weights[n] for n in models])
        got = live[key].detach().cpu()
        bad[key] = int((got.view(torch.int16) != ref.view(torch.int16)).sum())
    return bad if len(bad) <= 8 else {"tensors": len(bad), "differing_elements": sum(bad.values())}


def shard_map(n_layers: int, dev: str) -> dict[str, str]:
    """Embeddings + first half of the layers on ``dev``, the rest on ``cpu`` (all cpu when ``dev`` is)."""
    m = {"model.embed_tokens": dev, "model.rotary_emb": dev}
    m |= {f"model.layers.{i}": dev if i < n_layers // 2 else "cpu" for i in range(n_layers)}
    return m | {"model.norm": "cpu", "lm_head": "cpu"}


def sharded_kwargs(kind: str, n_layers: int, dev: str) -> dict:
    """Remixer arguments of the sharded section: ``split`` = :func:`shard_map` (one GPU + cpu); ``auto`` =
    transformers' balanced map over every visible GPU (90% of each), no cpu (a multi-GPU node)."""
    if kind == "split" or not torch.cuda.is_available():
        return {"device_map": shard_map(n_layers, dev)}
    return {
        k: v
        for k, v in parallel.remixer_placement(list(range(torch.cuda.device_count()))).items()
        if k in ("device_map", "max_memory")
    } or {"device_map": {"": dev}}


def placement_summary(rmx: Remixer) -> dict:
    """Bytes of live tensors and of expert copies per device."""
    out: dict[str, dict[str, int]] = {}
    for k, t in rmx.targets.items():
        out.setdefault(str(t.device), {"live_bytes": 0, "expert_bytes": 0})["live_bytes"] += t.nbytes
        for n in rmx.names:
            e = rmx.experts[n][k]
            out.setdefault(str(e.device), {"live_bytes": 0, "expert_bytes": 0})["expert_bytes"] += e.nbytes
    return out


def measure_remixer(rmx: Remixer, models: dict, a: argparse.Namespace, ids: torch.Tensor, keys) -> dict:
    names = list(models)
    res = {"placement": placement_summary(rmx), "remix_s": time_mixes(rmx, names, a.repeats)}
    res |= forward_rate(rmx.model, ids.to(rmx.device), a.repeats)
    res["bits_differing"] = bit_check(rmx, models, dict(zip(names, [0.35, 0.3, 0.2, 0.1], strict=False)), keys)
    return res


def check_keys(n_layers: int, tiny: bool) -> list[str] | None:
    if tiny:
        return None
    last = n_layers - 1
    return [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.k_proj.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]


# ------------------------------------------------------------------------------------ points across devices


def spin(iters: int) -> int:
    """A fixed amount of GIL-holding pure-Python work (the lm-eval-side proxy)."""
    x = 0
    for i in range(iters):
        x += i * i % 7
    return x


def spin_rate() -> float:
    """Iterations of :func:`spin` per millisecond on this machine (one thread, best of three)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        spin(200_000)
        best = min(best, time.perf_counter() - t)
    return 200_000 / (best * 1000)


def fixed_ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def bench_worker(models: dict[str, str], kw: dict, ids: torch.Tensor, spin_iters: int, threads: int) -> parallel.Worker:
    """One worker: its own Remixer (``kw``) and the evaluation proxy (a forward pass + ``spin_iters``)."""
    torch.set_num_threads(threads)
    rmx = Remixer(models, **kw)
    x = ids.to(rmx.device)

    def evaluate(weights: dict[str, float]) -> dict:
        with torch.no_grad():
            logits = rmx.mix(weights)(x).logits[:, -1].float()
        spin(spin_iters)
        return {"score": float(torch.log_softmax(logits, -1)[:, 0].mean())}

    return evaluate


def worker_kwargs(n: int, per_worker: int) -> list[dict]:
    """Remixer placement of each of ``n`` workers: GPU groups in turn (shared when there are fewer), or CPU."""
    if not torch.cuda.is_available():
        return [{"device": "cpu"}] * n
    groups = parallel.device_groups(torch.cuda.device_count(), per_worker)
    return [parallel.remixer_placement(groups[i % len(groups)]) for i in range(n)]


def run_parallel(models: dict[str, str], a: argparse.Namespace, ids: torch.Tensor) -> dict:
    from soce import method

    names = list(models)
    points = [dict(zip(names, map(float, p), strict=True)) for p in method.weight_grid(len(names), 0.1, 0.1)]
    points = (points * (a.points // len(points) + 1))[: a.points]
    rate = spin_rate()
    iters = int(a.python_ms * rate)
    kws = worker_kwargs(a.workers, a.gpus_per_worker)
    args = (ids, iters, torch.get_num_threads())
    res: dict = {"workers": a.workers, "placements": kws, "points": len(points), "python_ms": a.python_ms}
    workers = [bench_worker(models, kws[0], *args)]
    workers[0](points[0])  # warm-up (kernels, scratch buffers), here and for every worker below
    t = time.perf_counter()
    serial = parallel.evaluate_points(workers, points)
    res["serial_s"] = round(time.perf_counter() - t, 3)
    if "threads" in a.parallel_modes:
        workers += [bench_worker(models, kw, *args) for kw in kws[1:]]
        for w in workers[1:]:
            w(points[0])
        t = time.perf_counter()
        got = parallel.evaluate_points(workers, points)
        wall = time.perf_counter() - t
        res["threads"] = {
            "wall_s": round(wall, 3),
            "speedup": round(res["serial_s"] / wall, 3),
            "identical_to_serial": got == serial,
        }
    del workers
    free_gpu()
    if "processes" in a.parallel_modes:
        t = time.perf_counter()
        procs = [parallel.ProcessWorker(bench_worker, models, kw, *args) for kw in kws]
        try:
            for p in procs:
                p.ready()
            start = time.perf_counter() - t
            for p in procs:
                p(points[0])
            t = time.perf_counter()
            got = parallel.evaluate_points(procs, points)
            wall = time.perf_counter() - t
        finally:
            for p in procs:
                p.close()
        res["processes"] = {
            "wall_s": round(wall, 3),
            "speedup": round(res["serial_s"] / wall, 3),
            "identical_to_serial": got == serial,
            "startup_s": round(start, 1),
        }
    return res


def free_gpu() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    ap.add_argument("--layers", type=int, default=None, help="build the first N layers (default: 4 for 70b)")
    ap.add_argument("--tiny", action="store_true", help="small shapes, few repeats: runs in seconds on a CPU")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--distinct", type=int, default=2, help="random experts; the others are hard links")
    ap.add_argument("--sections", default="single,sharded,parallel")
    ap.add_argument(
        "--map",
        choices=["split", "auto"],
        default="split",
        help="sharded section: split = first half on the GPU, rest on cpu; auto = over all GPUs",
    )
    ap.add_argument("--placements", default="with_shard,host", help="sharded section: expert placements to time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpus-per-worker", type=int, default=1)
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument(
        "--python-ms",
        type=float,
        default=None,
        help="GIL-holding Python work per point, ms (default 50; 5 with --tiny)",
    )
    ap.add_argument("--parallel-modes", default="threads,processes")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "sharded")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.tiny:  # one torch thread: OpenMP barriers crawl on a busy small CPU machine
        torch.set_num_threads(1)
        a.shape, a.repeats, a.batch, a.seq, a.points = "tiny", 2, 2, 16, min(a.points, 6)
    if a.python_ms is None:
        a.python_ms = 5.0 if a.tiny else 50.0
    if a.layers is None:
        a.layers = 4 if a.shape == "70b" else SHAPES[a.shape]["layers"]
    return a


def main(argv: list[str] | None = None) -> int:
    import transformers

    a = parse(argv)
    dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    full = SHAPES[a.shape]
    shape = {**full, "layers": a.layers}
    scale_bytes = n_params(full) / n_params(shape)
    res: dict = {
        "shape": a.shape,
        "layers": a.layers,
        "layers_full": full["layers"],
        "experts": a.experts,
        "params": n_params(shape),
        "params_full": n_params(full),
        "full_over_truncated": round(scale_bytes, 3),
        "device": dev,
        "gpu": torch.cuda.get_device_name(0) if dev != "cpu" else None,
        "gpus_visible": torch.cuda.device_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "evaluation_proxy": f"forward {a.batch}x{a.seq} tokens",
    }
    t = time.perf_counter()
    shard = 5 * 10**9 if a.shape != "tiny" else 10**6
    dirs = build(
        a.workdir / f"{a.shape}-{a.layers}", shape, a.experts, min(a.distinct, a.experts), shard, torch.device(dev)
    )
    res["build_s"] = round(time.perf_counter() - t, 1)
    models = {d.name: str(d) for d in dirs}
    ids = fixed_ids(a.batch, a.seq, shape["vocab"])
    keys = check_keys(a.layers, a.tiny)
    sections = a.sections.split(",")
    if "single" in sections:
        res["single"] = measure_remixer(Remixer(models, device=dev), models, a, ids, keys)
        free_gpu()
    if "sharded" in sections:
        kw = sharded_kwargs(a.map, a.layers, dev)
        res["sharded"] = {"map": a.map, "remixer": {k: v for k, v in kw.items() if k != "device_map"}}
        for placement in a.placements.split(","):
            try:
                rmx = Remixer(models, **kw, expert_placement=placement)
            except SoupError as e:  # e.g. with_shard where a GPU cannot hold its shard's experts
                res["sharded"][placement] = {"error": str(e)}
                continue
            res["sharded"][placement] = measure_remixer(rmx, models, a, ids, keys)
            del rmx
            free_gpu()
    if "parallel" in sections:
        res["parallel"] = run_parallel(models, a, ids)
    project(res, scale_bytes)
    line = json.dumps(res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    print(line)
    return 0


def project(res: dict, scale: float) -> None:
    """Add ``*_full_proj`` fields: truncated-model seconds scaled to the full depth (a linear projection)."""
    for r in [res.get("single"), *(v for v in res.get("sharded", {}).values() if isinstance(v, dict))]:
        if r and "remix_s" in r:
            r["remix_s_full_proj"] = round(r["remix_s"]["median"] * scale, 4)
            r["forward_s_full_proj"] = round(r["forward_s"] * scale, 4)


if __name__ == "__main__":
    sys.exit(main())
