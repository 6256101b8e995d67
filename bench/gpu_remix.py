"""GPU timing: in-memory re-mix of resident experts (Remixer) and the final soup written to disk.

    python bench/gpu_remix.py                       # Llama-3.1-8B shapes, 3 experts, on the GPU
    python bench/gpu_remix.py --shape tiny          # small shapes: runs anywhere, CPU included (a test)
    python bench/gpu_remix.py --mergekit bench/.venv/bin/mergekit-yaml   # also time mergekit-yaml --cuda

Steps: (1) bit-equality of the arithmetic on the device vs the CPU streaming path, on random tensors;
(2) build expert checkpoints (bf16, sharded; ``--distinct`` of them random, the others hard links, because an
H100 machine has 64 GiB of disk: three 16 GB experts and a 16 GB output do not fit otherwise); (3) Remixer:
experts resident on the device, timed re-mixes (CUDA synchronised before and after each), bit-checked against
the CPU reference on a few tensors; (4) ``python -m soce.merge`` to disk, timed (wall, peak RSS), and
``mergekit-yaml --cuda`` on the same inputs when given, with a bitwise comparison of both outputs.
Prints a JSON summary as its last line (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from merge_bench import compare, llama_shapes, measure  # noqa: E402

import soce.soup.remix as soup  # noqa: E402  (the module whose GPU_CHUNK_ELEMS the re-mix reads)
from soce.soup import Coefficients, Remixer, mix_into, open_checkpoint, reference_soup  # noqa: E402

SHAPES = {
    # Llama-3.1-8B: 8.03B parameters, 16.06 GB in bf16
    "8b": dict(layers=32, hidden=4096, inter=14336, vocab=128256, heads=32, kv=8),
    "1b": dict(layers=16, hidden=2048, inter=8192, vocab=128256, heads=32, kv=8),
    "tiny": dict(layers=2, hidden=128, inter=256, vocab=512, heads=4, kv=2),
}


def config(s: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def check_arithmetic(dev: torch.device, n: int = 3_000_017) -> dict:
    """The device's re-mix arithmetic (no conversion buffer: CUDA casts in-kernel) vs the CPU streaming
    path and the whole-tensor reference, bitwise, for weights summing to 1 and not."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g).to(torch.bfloat16) for _ in range(3)]
    out = {}
    for ws in ([0.5, 0.3, 0.2], [0.35, 0.3, 0.2]):
        cpu = torch.empty(n, dtype=torch.bfloat16)
        mix_into(cpu, ts, Coefficients.make(ws, torch.float32), torch.empty(n), torch.empty(n))
        d = torch.empty(n, dtype=torch.bfloat16, device=dev)
        mix_into(d, [t.to(dev) for t in ts], Coefficients.make(ws, torch.float32, dev), torch.empty(n, device=dev))
        ref = reference_soup(ts, ws)
        out[str(ws)] = {
            "device_eq_cpu": torch.equal(d.cpu().view(torch.int16), cpu.view(torch.int16)),
            "cpu_eq_reference": torch.equal(cpu.view(torch.int16), ref.view(torch.int16)),
        }
    return out


def build(workdir: Path, shape: dict, n: int, distinct: int, shard_bytes: int, dev: torch.device) -> list[Path]:
    """n checkpoints: the first ``distinct`` random, the rest hard links to expert 0's files."""
    cfg = config(shape)
    stamp = json.dumps([cfg, distinct, shard_bytes], sort_keys=True)
    dirs = [workdir / f"expert{j}" for j in range(n)]
    if all((d / "stamp.json").is_file() and (d / "stamp.json").read_text() == stamp for d in dirs):
        return dirs
    shapes = llama_shapes(cfg)
    keys = sorted(shapes)
    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:
        b = 2 * int(torch.Size(shapes[k]).numel())
        if groups[-1] and size + b > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += b
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for j, d in enumerate(dirs):
        t0 = time.perf_counter()
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        index = {"metadata": {}, "weight_map": {k: names[i] for i, g in enumerate(groups) for k in g}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        if j >= distinct:
            for name in names:
                os.link(dirs[0] / name, d / name)
        else:
            gen = torch.Generator(device=dev).manual_seed(j)
            for name, group in zip(names, groups, strict=True):
                sd = {
                    k: (torch.randn(shapes[k], generator=gen, device=dev) * 0.02).to(torch.bfloat16).cpu()
                    for k in group
                }
                save_file(sd, d / name, metadata={"format": "pt"})
                del sd
        (d / "stamp.json").write_text(stamp)
        print(f"built {d} in {time.perf_counter() - t0:.1f}s{' (hard links)' if j >= distinct else ''}", flush=True)
    return dirs


def time_ties(models: dict, base: Path, dev: torch.device, density: float, time_mixes) -> dict:
    """Re-mix times of a TIES soup of the same experts (``base``: a checkpoint of the same shapes), after
    the Remixer's one-off preparation (the trim masks, found on the CPU: timed apart): with the fused kernel
    (soce/soup/task_kernel.py) and without it (``SOCE_FUSED_MIX=0``: mix_chunk's torch ops), and the number
    of live-model elements where the two differ (every tensor)."""
    t0 = time.perf_counter()
    rmx = Remixer(models, device=str(dev), merge={"method": "ties", "density": density}, base=base)
    sync(dev)
    out = {"init_s": round(time.perf_counter() - t0, 1), "fused": time_mixes(rmx)}
    weights = dict(zip(models, [0.5, 0.3, 0.2, 0.1][: len(models)], strict=False))
    rmx.mix(weights)
    fused = {k: t.detach().view(-1).view(torch.int16).cpu() for k, t in rmx.targets.items()}  # (host: GPU is full)
    before = os.environ.get("SOCE_FUSED_MIX")
    os.environ["SOCE_FUSED_MIX"] = "0"
    try:
        out["unfused"] = time_mixes(rmx)
        rmx.mix(weights)
        sync(dev)
        diff = sum(int((rmx.targets[k].detach().view(-1).view(torch.int16).cpu() != v).sum()) for k, v in fused.items())
    finally:
        if before is None:
            del os.environ["SOCE_FUSED_MIX"]
        else:
            os.environ["SOCE_FUSED_MIX"] = before
    out["fused_vs_unfused_differing"] = diff
    out["median"] = out["fused"]["median"]
    del rmx, fused
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--distinct", type=int, default=None, help="random experts (default: 2 for 8b, else all)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "gpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="skip the soup-to-disk timings")
    ap.add_argument(
        "--mergekit",
        default=None,
        help="mergekit-yaml command ('python3 -m mergekit.scripts.run_yaml'): also time it with --cuda",
    )
    ap.add_argument("--chunks", default="", help="GPU chunk sizes (elements, comma separated) to time the re-mix with")
    ap.add_argument("--keep", action="store_true", help="keep the expert checkpoints for a later run")
    ap.add_argument(
        "--ties",
        type=float,
        default=None,
        metavar="DENSITY",
        help="also time a TIES re-mix (base: the first expert; its task vector is 0) against linear",
    )
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    dev = torch.device(a.device)
    shape = SHAPES[a.shape]
    distinct = a.distinct if a.distinct is not None else (2 if a.shape == "8b" else a.experts)
    res: dict = {
        "shape": a.shape,
        "experts": a.experts,
        "device": str(dev),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    }

    res["arithmetic"] = check_arithmetic(dev)
    print("arithmetic bit checks:", res["arithmetic"], flush=True)

    t0 = time.perf_counter()
    shard = 5 * 10**9 if a.shape == "8b" else 50 * 10**6
    dirs = build(a.workdir / "ckpt", shape, a.experts, distinct, shard, dev)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    models = {d.name: d for d in dirs}
    ws = [0.5, 0.3, 0.2][: a.experts] if a.experts <= 3 else [1.0 / a.experts] * a.experts
    weights = dict(zip(models, ws, strict=True))

    default_chunk = soup.GPU_CHUNK_ELEMS
    t0 = time.perf_counter()
    rmx = Remixer(models, device=str(dev))
    sync(dev)
    res["remixer_init_s"] = round(time.perf_counter() - t0, 1)
    res["experts_on"] = str(rmx.expert_device)

    def time_mixes(rmx: Remixer) -> dict:
        times = []
        for r in range(a.repeats + 1):
            w = dict(zip(models, [ws[(i + r) % len(ws)] for i in range(len(ws))], strict=True))
            sync(dev)
            t = time.perf_counter()
            rmx.mix(w)
            sync(dev)
            if r:  # the first one warms up kernels and allocates scratch buffers
                times.append(time.perf_counter() - t)
        return {
            "median": round(statistics.median(times), 4),
            "min": round(min(times), 4),
            "all": [round(x, 4) for x in times],
        }

    if a.chunks:
        res["remix_by_chunk"] = {}
        for c in a.chunks.split(","):
            soup.GPU_CHUNK_ELEMS = int(c)
            res["remix_by_chunk"][c] = time_mixes(rmx)
            print(f"  chunk {c}: {res['remix_by_chunk'][c]}", flush=True)
        soup.GPU_CHUNK_ELEMS = default_chunk
    res["remix_s"] = time_mixes(rmx)
    print(
        f"in-memory re-mix ({a.experts} experts on {rmx.expert_device}): median {res['remix_s']['median']} s,"
        f" min {res['remix_s']['min']} s",
        flush=True,
    )

    # bit check of the live model against the CPU reference on a few tensors
    rmx.mix(weights)
    sync(dev)
    ck = [open_checkpoint(n, p) for n, p in models.items()]
    from safetensors import safe_open

    bad = {}
    for key in ("model.norm.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        srcs = []
        for c in ck:
            with safe_open(c.tensors[key].file, "pt") as f:
                srcs.append(f.get_tensor(key))
        ref = reference_soup(srcs, ws)
        got = rmx.targets[key].detach().cpu()
        bad[key] = int((got.view(torch.int16) != ref.view(torch.int16)).sum())
    res["remix_vs_cpu_reference_differing"] = bad
    print("live model vs CPU reference, differing elements:", bad, flush=True)
    del rmx
    gc.collect()  # the Remixer's experts and live model must be gone before the TIES one loads its own
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if a.ties is not None:
        res["remix_ties_s"] = time_ties(models, dirs[0], dev, a.ties, time_mixes)
        t = res["remix_ties_s"]
        res["ties_over_linear"] = round(t["fused"]["median"] / res["remix_s"]["median"], 2)
        res["ties_unfused_over_linear"] = round(t["unfused"]["median"] / res["remix_s"]["median"], 2)
        print(
            f"TIES re-mix (density {a.ties}): fused {t['fused']}, {res['ties_over_linear']}x linear;"
            f" unfused {t['unfused']}, {res['ties_unfused_over_linear']}x linear;"
            f" elements differing fused vs unfused: {t['fused_vs_unfused_differing']}",
            flush=True,
        )

    if not a.no_write:
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1"
        )
        outs = {"soce": a.workdir / "out-soce", "mergekit": a.workdir / "out-mergekit"}
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "soce.merge",
            f"output={outs['soce']}",
            f"models=[{','.join(map(str, dirs))}]",
            f"weights=[{','.join(map(repr, ws))}]",
        ]
        wall, rss = measure(cmd, env)
        res["soce_write"] = {"wall_s": round(wall, 2), "peak_rss_gib": round(rss / 2**30, 2)}
        print(f"soce soup to disk: {wall:.2f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
        if a.mergekit:
            cfg = a.workdir / "mergekit.yml"
            lines = ["merge_method: linear", "dtype: bfloat16", "models:"]
            for d, w in zip(dirs, ws, strict=True):
                lines += [f"  - model: {d}", "    parameters:", f"      weight: {w!r}"]
            cfg.write_text("\n".join(lines) + "\n")
            extra = ["--cuda"] if dev.type == "cuda" else []
            wall, rss = measure([*shlex.split(a.mergekit), str(cfg), str(outs["mergekit"]), *extra], env)
            res["mergekit_write"] = {"wall_s": round(wall, 2), "peak_rss_gib": round(rss / 2**30, 2)}
            print(f"mergekit-yaml {' '.join(extra)} to disk: {wall:.2f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
            res["soce_vs_mergekit"] = compare(outs["soce"], outs["mergekit"])
            print("soce vs mergekit:", res["soce_vs_mergekit"], flush=True)
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(a.workdir / "ckpt", ignore_errors=True)
    line = json.dumps(res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
