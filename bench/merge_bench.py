"""Benchmark: soce's streaming soup against mergekit 0.1.5, on synthetic Llama-shaped checkpoints.

Builds N bf16 checkpoints (default 4 x 322 MiB, 168M parameters, Llama layout, untied lm_head: a common
base plus per-model noise, like fine-tunes; the base is written too), merges them with ``python -m soce.merge``
and with ``mergekit-yaml`` (from a bench-only venv), each in its own process, and reports wall time and
peak RSS (``os.wait4`` rusage of that process and its children) and the ratios soce/mergekit. Then checks
the outputs bit for bit (linear: also against the torch fp32 reference) for the main weights, and reports
the largest difference in units in the last place (ULP) for other weights.

``--method ties`` (or ``task_arithmetic``) merges task vectors over the base with ``--density``: mergekit
runs with ``dtype: float32`` and ``out_dtype: bfloat16``, the arithmetic soce does (one rounding at the end).

    bash bench/run.sh [--repeats 3] [--workdir .bench] [--layers 8] [--models 4] [--method ties]

Exit status 1 if the outputs differ bitwise for the main weights or a target is missed (``--strict``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
MAIN_WEIGHTS = [0.4, 0.3, 0.2, 0.1]
OTHER_WEIGHTS = [[0.55, 0.25, 0.15, 0.05], [0.35, 0.3, 0.2, 0.1], [3.0, 1.0, 1.0, 1.0], [0.7, 0.1, 0.1, 0.1]]
TARGETS = {"linear": (1 / 3, 1 / 2), "ties": (1 / 2, 1 / 2), "task_arithmetic": (1 / 2, 1 / 2)}  # wall, RSS


def llama_config(layers: int, hidden: int, inter: int, vocab: int, heads: int, kv: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """File keys and shapes of a Llama checkpoint (transformers layout)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kvd = hd * cfg["num_key_value_heads"]
    s: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        s |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kvd, h),
            p + "self_attn.v_proj.weight": (kvd, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return s


def build(workdir: Path, n_models: int, cfg: dict) -> list[Path]:
    """Write n random bf16 checkpoints (same base + per-model noise, like fine-tunes); reused if present."""
    stamp = json.dumps(cfg, sort_keys=True)
    dirs = [workdir / f"m{j}" for j in range(n_models)]
    if all(
        (d / "bench_stamp.json").is_file() and (d / "bench_stamp.json").read_text() == stamp
        for d in [*dirs, workdir / "base"]
    ):
        return dirs
    shapes = llama_shapes(cfg)
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen).mul_(0.02) for k, s in shapes.items()}
    _write(workdir / "base", {k: b.to(torch.bfloat16) for k, b in base.items()}, cfg, stamp)
    for j, d in enumerate(dirs):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(j + 1)
        sd = {k: (b + torch.randn(b.shape, generator=g).mul_(0.002)).to(torch.bfloat16) for k, b in base.items()}
        _write(d, sd, cfg, stamp)
        del sd
        print(
            f"built {d} ({(d / 'model.safetensors').stat().st_size / 2**20:.0f} MiB) in"
            f" {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    return dirs


def _write(d: Path, sd: dict, cfg: dict, stamp: str) -> None:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (d / "bench_stamp.json").write_text(stamp)


# Runs in a fresh small interpreter: the measured command is forked from it, not from this process (a child
# forked from a big parent inherits the parent's RSS high-water mark across exec).
_WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": r.returncode, "wall": wall, "rss": rss, "err": r.stderr.decode()[-3000:]}))
"""


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run cmd; return (wall seconds, peak RSS in bytes) of that process and its children."""
    out = subprocess.run(
        [sys.executable, "-S", "-c", _WRAPPER, *cmd], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout)
    if r["rc"] != 0:
        raise SystemExit(f"command failed ({r['rc']}): {' '.join(cmd)}\n{r['err']}")
    return r["wall"], float(r["rss"])


@dataclass(frozen=True)
class Op:
    """The operator benchmarked: ``method``, its ``density`` (TIES), the ``base`` dir (task vectors)."""

    method: str = "linear"
    density: float = 0.5
    base: Path | None = None


def soce_cmd(py: str, dirs: list[Path], ws: list[float], out: Path, op: Op = Op()) -> list[str]:
    cmd = [
        py,
        "-m",
        "soce.merge",
        f"output={out}",
        f"models=[{','.join(map(str, dirs))}]",
        f"weights=[{','.join(map(repr, ws))}]",
    ]
    if op.method != "linear":
        cmd += [f"method={op.method}", f"base={op.base}"] + ([f"density={op.density}"] if op.method == "ties" else [])
    return cmd


def mergekit_cmd(mk: str, dirs: list[Path], ws: list[float], out: Path, extra: list[str], op: Op = Op()) -> list[str]:
    cfg = out.parent / f"{out.name}.yml"
    if op.method == "linear":
        lines = ["merge_method: linear", "dtype: bfloat16", "models:"]
    else:  # soce's arithmetic: float32 throughout, one rounding to bfloat16 at the end
        lines = [f"merge_method: {op.method}", f"base_model: {op.base}", "dtype: float32", "out_dtype: bfloat16"]
        lines += ["parameters:", f"  density: {op.density}"] if op.method == "ties" else []
        lines += ["models:"]
    for d, w in zip(dirs, ws, strict=True):
        lines += [f"  - model: {d}", "    parameters:", f"      weight: {w!r}"]
    cfg.write_text("\n".join(lines) + "\n")
    return [mk, str(cfg), str(out), *extra]


def _tensors(out: Path):
    files = sorted(out.glob("*.safetensors"))
    handles = [safe_open(f, "pt") for f in files]
    keys = {k: h for h in handles for k in h.keys()}
    return keys


def ordered(bits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 bit patterns -> integers whose difference counts ULPs (+0 and -0 both 0)."""
    i = bits.view(torch.int16).to(torch.int32)
    mag = i & 0x7FFF
    return torch.where(i < 0, -mag, mag)


def compare(a: Path, b: Path) -> dict:
    """Bitwise comparison of two checkpoint dirs: differing elements and the largest ULP difference."""
    ka, kb = _tensors(a), _tensors(b)
    if ka.keys() != kb.keys():
        return {"same_keys": False, "missing": sorted(ka.keys() ^ kb.keys())[:5]}
    diff = 0
    max_ulp = 0
    n = 0
    for k in sorted(ka):
        x, y = ka[k].get_tensor(k), kb[k].get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape:
            return {"same_keys": True, "tensor": k, "dtype_or_shape_differs": True}
        n += x.numel()
        ne = x.view(torch.int16) != y.view(torch.int16)
        c = int(ne.sum())
        if c:
            diff += c
            max_ulp = max(max_ulp, int((ordered(x) - ordered(y)).abs().max()))
    return {"same_keys": True, "elements": n, "differing": diff, "max_ulp": max_ulp, "identical": diff == 0}


def reference_check(dirs: list[Path], ws: list[float], out: Path) -> dict:
    """soce output vs a whole-tensor torch reference: float32 accumulator from 0, acc += w_j * t_j as fused
    multiply-add (addcmul_), divided by the float32 weight sum unless 1, rounded to bf16. Also counts the
    elements where the unfused ``sum(w * t.float())`` (two roundings per term) would differ."""
    w = torch.tensor(ws, dtype=torch.float32)
    hs = [safe_open(d / "model.safetensors", "pt") for d in dirs]
    ko = _tensors(out)
    bad = unfused = 0
    for k in hs[0].keys():
        ts = [h.get_tensor(k) for h in hs]
        acc = torch.zeros(ts[0].shape)
        for j, t in enumerate(ts):
            acc.addcmul_(t, w[j])
        if w.sum() != 1:
            acc /= w.sum()
        got = ko[k].get_tensor(k).view(torch.int16)
        bad += int((acc.to(torch.bfloat16).view(torch.int16) != got).sum())
        plain = sum(float(wj) / float(w.sum()) * t.float() for wj, t in zip(w, ts, strict=True))
        unfused += int((plain.to(torch.bfloat16).view(torch.int16) != got).sum())
    return {"differing_from_reference": bad, "identical": bad == 0, "differing_from_unfused_sum": unfused}


def prewarm(dirs: list[Path]) -> None:
    for d in dirs:
        with open(d / "model.safetensors", "rb") as f:
            while f.read(64 << 20):
                pass


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="linear", choices=sorted(TARGETS))
    ap.add_argument("--density", type=float, default=0.5, help="--method ties: fraction of each task vector kept")
    ap.add_argument("--other-weights", action="store_true", help="also compare the bits for other weight sets")
    ap.add_argument("--soce-python", default=os.environ.get("SOCE_PYTHON", str(ROOT / ".venv/bin/python")))
    ap.add_argument("--mergekit", default=os.environ.get("MERGEKIT", str(ROOT / "bench/.venv/bin/mergekit-yaml")))
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml options, space separated")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap.parse_args()


def _timed(tools: dict, ws: list[float], outs: dict[str, Path], env: dict, repeats: int) -> dict:
    """Each tool ``repeats`` times, alternating (same cache state): median wall, max peak RSS."""
    runs: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
    for r in range(repeats):
        for t, make in tools.items():
            shutil.rmtree(outs[t], ignore_errors=True)
            wall, rss = measure(make(ws, outs[t]), env)
            runs[t].append((wall, rss))
            print(f"  run {r + 1} {t:9s} wall {wall:6.2f} s  peak RSS {rss / 2**30:5.2f} GiB", flush=True)
    out = {
        t: {
            "wall_s": statistics.median(w for w, _ in rs),
            "peak_rss_bytes": max(m for _, m in rs),
            "walls": [round(w, 3) for w, _ in rs],
        }
        for t, rs in runs.items()
    }
    print("\nresult (median wall, max peak RSS over runs):")
    for t, v in out.items():
        print(f"  {t:9s} wall {v['wall_s']:6.2f} s   peak RSS {v['peak_rss_bytes'] / 2**30:5.2f} GiB")
    return out


def _against_mergekit(res: dict, tools: dict, outs: dict[str, Path], env: dict, a: argparse.Namespace) -> bool:
    """Ratios and bitwise comparison with mergekit (main weights; other weight sets with --other-weights)."""
    target_wall, target_rss = TARGETS[a.method]
    s, m = res["tools"]["soce"], res["tools"]["mergekit"]
    res["ratio_wall"] = s["wall_s"] / m["wall_s"]
    res["ratio_rss"] = s["peak_rss_bytes"] / m["peak_rss_bytes"]
    print(
        f"  ratio soce/mergekit: wall {res['ratio_wall']:.3f} (target <= {target_wall:.3f}),"
        f" peak RSS {res['ratio_rss']:.3f} (target <= {target_rss:.3f})"
    )
    res["compare_main"] = compare(outs["soce"], outs["mergekit"])
    print(f"  soce vs mergekit, weights {res['weights']}: {res['compare_main']}")
    ok = bool(res["compare_main"].get("identical"))
    ok &= res["ratio_wall"] <= target_wall and res["ratio_rss"] <= target_rss
    if a.models == 4 and (a.other_weights or a.method == "linear"):
        res["compare_other"] = []
        for w in OTHER_WEIGHTS:
            for t, make in tools.items():
                shutil.rmtree(outs[t], ignore_errors=True)
                measure(make(w, outs[t]), env)
            c = compare(outs["soce"], outs["mergekit"])
            c["weights"] = w
            res["compare_other"].append(c)
            print(
                f"  soce vs mergekit, weights {w}: differing {c.get('differing')} of {c.get('elements')},"
                f" max {c.get('max_ulp')} ULP",
                flush=True,
            )
            ok &= bool(c.get("identical")) or a.method == "linear" and sum(w) != 1
    return ok


def main() -> int:
    a = _args()
    cfg = llama_config(a.layers, a.hidden, a.intermediate, a.vocab, 16, 16)
    a.workdir.mkdir(parents=True, exist_ok=True)
    dirs = build(a.workdir / "ckpt", a.models, cfg)
    op = Op(a.method, a.density, a.workdir / "ckpt" / "base")
    n_params = sum(math.prod(s) for s in llama_shapes(cfg).values())
    size = sum((d / "model.safetensors").stat().st_size for d in dirs)
    ws = MAIN_WEIGHTS if a.models == 4 else [1.0 / a.models] * a.models
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    tools = {"soce": lambda w, o: soce_cmd(a.soce_python, dirs, w, o, op)}
    if not a.skip_mergekit:
        if not Path(a.mergekit).exists():
            raise SystemExit(f"{a.mergekit} missing: run bash bench/run.sh (creates bench/.venv)")
        tools["mergekit"] = lambda w, o: mergekit_cmd(a.mergekit, dirs, w, o, a.mergekit_args.split(), op)
    print(
        f"{a.method}: {a.models} checkpoints x {size / a.models / 2**20:.0f} MiB bf16 ({n_params / 1e6:.0f}M"
        f" params), weights {ws}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        flush=True,
    )
    prewarm([*dirs, *([op.base] if a.method != "linear" else [])])
    outs = {t: a.workdir / f"out-{t}" for t in tools}
    res: dict = {
        "method": a.method,
        "models": a.models,
        "params": n_params,
        "bytes_per_model": size // a.models,
        "weights": ws,
        "cpus": os.cpu_count(),
        "tools": _timed(tools, ws, outs, env, a.repeats),
    }
    if a.method == "ties":
        res["density"] = a.density
    ok = True
    if a.method == "linear":
        res["reference"] = reference_check(dirs, ws, outs["soce"])
        print(
            f"  soce == torch fp32 fused reference (bitwise): {res['reference']['identical']}"
            f" (unfused sum(w*t.float()) would differ in {res['reference']['differing_from_unfused_sum']}"
            f" of {n_params} elements)"
        )
        ok &= res["reference"]["identical"]
    if "mergekit" in tools:
        ok &= _against_mergekit(res, tools, outs, env, a)
    for t in tools:
        shutil.rmtree(outs[t], ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    print("targets met" if ok else "TARGET MISSED")
    return 0 if ok or not a.strict else 1


if __name__ == "__main__":
    sys.exit(main())
