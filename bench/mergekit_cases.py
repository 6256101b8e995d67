"""Bit check of soce's task_arithmetic and ties against mergekit 0.1.5's own merge methods, tensor by tensor.

Two steps, two interpreters: ``make`` runs in the bench venv (mergekit installed: ``bash bench/run.sh``
creates it) and saves random inputs and mergekit's outputs (``dtype=float32``, ``out_dtype`` bf16 or fp32);
``check`` runs in soce's venv and recomputes them with :func:`soce.soup.operators.task_vectors.merge_tensor`
at several chunk sizes.

    bench/.venv/bin/python bench/mergekit_cases.py make /tmp/mk_cases.safetensors
    PYTHONPATH=. .venv/bin/python bench/mergekit_cases.py check /tmp/mk_cases.safetensors
"""

from __future__ import annotations

import json
import sys

import torch

SHAPES = [(64, 48), (4096,), (129, 33), (1000,)]  # 129*33 and 1000: not multiples of 32
CASES = [  # method, models, density, lambda, normalize, weights, dtype
    ("task_arithmetic", 3, 1.0, 1.0, False, [0.5, 0.3, 0.2], "bfloat16"),
    ("task_arithmetic", 4, 1.0, 0.7, True, [0.4, 0.3, 0.2, 0.1], "bfloat16"),
    ("task_arithmetic", 2, 1.0, 1.3, False, [1.0, 1.0], "float32"),
    ("ties", 3, 0.5, 1.0, True, [0.5, 0.3, 0.2], "bfloat16"),
    ("ties", 4, 0.2, 1.0, True, [0.4, 0.3, 0.2, 0.1], "bfloat16"),
    ("ties", 3, 0.7, 0.8, False, [0.6, 0.3, 0.1], "float32"),
    ("ties", 2, 0.33, 1.0, True, [0.7, 0.3], "float32"),
    ("ties", 4, 0.5, 1.0, True, [1.0, 2.0, 0.5, 0.25], "bfloat16"),
]


def make(path: str) -> None:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    from safetensors.torch import save_file

    torch.manual_seed(0)
    out = {}
    for ci, (method, n, dens, lam, norm, ws, dt) in enumerate(CASES):
        dtype = getattr(torch, dt)
        for si, shape in enumerate(SHAPES):
            base = (torch.randn(shape) * 0.02).to(dtype)
            xs = [(base.float() + torch.randn(shape) * 0.002 * (j + 1)).to(dtype) for j in range(n)]
            ids = ["base"] + [f"m{j}" for j in range(n)]
            g = TensorGroup.from_tensors([base, *xs], ids=ids, base_index=0, name="t")
            params = {"weight": {f"m{j}": ws[j] for j in range(n)}, "lambda": lam, "normalize": norm}
            if method == "ties":
                params["density"] = {f"m{j}": dens for j in range(n)}
            for od in {dtype, torch.float32}:
                (res,) = registry.get(method)([g], parameters=params, dtype=torch.float32, out_dtype=od)
                out[f"c{ci}_s{si}_{str(od).split('.')[-1]}.out"] = res.contiguous()
            out[f"c{ci}_s{si}.base"] = base
            out.update({f"c{ci}_s{si}.x{j}": x for j, x in enumerate(xs)})
    save_file(out, path)
    print(f"{len(out)} tensors -> {path}")


def check(path: str) -> int:
    from safetensors import safe_open

    from soce.soup.operators import MergeSpec
    from soce.soup.operators.task_vectors import merge_tensor

    f = safe_open(path, "pt")
    keys, bad, total = set(f.keys()), 0, 0
    for ci, (method, n, dens, lam, norm, ws, _) in enumerate(CASES):
        spec = MergeSpec(method, density=dens, lam=lam, normalize=norm)
        for si in range(len(SHAPES)):
            base = f.get_tensor(f"c{ci}_s{si}.base")
            xs = [f.get_tensor(f"c{ci}_s{si}.x{j}") for j in range(n)]
            for od in (torch.bfloat16, torch.float32):
                tag = f"c{ci}_s{si}_{str(od).split('.')[-1]}.out"
                if tag not in keys:
                    continue
                ref = f.get_tensor(tag)
                iview = torch.int16 if od == torch.bfloat16 else torch.int32
                for chunk in (1 << 18, 100, 8):
                    got = merge_tensor(spec, "t", [f"m{j}" for j in range(n)], base, xs, ws, od, chunk)
                    total += 1
                    if not torch.equal(got.view(iview), ref.view(iview)):
                        bad += 1
                        print("differs:", method, CASES[ci], SHAPES[si], od, chunk)
    print(json.dumps({"cases": total, "differing": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "check"):
        raise SystemExit(__doc__)
    sys.exit(make(sys.argv[2]) if sys.argv[1] == "make" else check(sys.argv[2]))
