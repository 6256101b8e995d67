"""Fused GPU re-mix: one Triton kernel per tensor, bit for bit what :func:`soce.soup.mix_into` computes.

``mix_into`` on CUDA runs one torch kernel per expert plus a rounding copy: for three bf16 experts it moves
about 32 bytes per element (the float32 accumulator is read and written at each step). This kernel keeps
the accumulator in registers, reads each expert once and writes the soup once (8 bytes per element):
``acc = fma(x_j, w_j, acc)`` from +0 in candidate order, then the IEEE-rounded division by the weights' sum
when it is not 1, then one round-to-nearest-even to the output dtype, the same operations in the same order.

:class:`soce.soup.Remixer` uses it when the experts live on a CUDA device and Triton imports (``SOCE_FUSED_MIX=0``
turns it off); ``tests/test_soup.py`` checks it bitwise against ``mix_into`` where a GPU is present.
"""

from __future__ import annotations

import os
import threading

import torch

MAX_SOURCES = 8  # more experts than this fall back to mix_into
_READY: set[tuple] = set()  # kernel specialisations already launched once (compiled and loaded) in this process
_FIRST_LAUNCH = threading.Lock()  # Triton's JIT is not safe to enter from several threads (triton#5933)

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none, and need none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available(device: torch.device) -> bool:
    """Whether :func:`fused_mix` can run on ``device`` (CUDA, Triton importable, not disabled)."""
    return triton is not None and device.type == "cuda" and os.environ.get("SOCE_FUSED_MIX", "1") != "0"


if triton is not None:

    @triton.jit
    def _mix_kernel(
        out_ptr,
        x0,
        x1,
        x2,
        x3,
        x4,
        x5,
        x6,
        x7,
        w_ptr,
        den_ptr,
        n,
        N_SRC: tl.constexpr,
        HAS_DEN: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.fma(tl.load(x0 + offs, mask=mask).to(tl.float32), tl.load(w_ptr), acc)
        if N_SRC > 1:
            acc = tl.fma(tl.load(x1 + offs, mask=mask).to(tl.float32), tl.load(w_ptr + 1), acc)
        if N_SRC > 2:
            acc = tl.fma(tl.load(x2 + offs, mask=mask).to(tl.float32), tl.load(w_ptr + 2), acc)
        if N_SRC > 3:
            acc = tl.fma(tl.load(x3 + offs, mask=mask).to(tl.float32), tl.load(w_ptr + 3), acc)
        if N_SRC > 4:
            acc = tl.fma(tl.load(x4 + offs, mask=mask).to(tl.float32), tl.load(w_ptr + 4), acc)
        if N_SRC > 5:
            acc = tl.fma(tl.load(x5 + offs, mask=mask).to(tl.float32), tl.load(w_ptr + 5), acc)
        if N_SRC > 6:
            acc = tl.fma(tl.load(x6 + offs, mask=mask).to(tl.float32), tl.load(w_ptr + 6), acc)
        if N_SRC > 7:
            acc = tl.fma(tl.load(x7 + offs, mask=mask).to(tl.float32), tl.load(w_ptr + 7), acc)
        if HAS_DEN:
            acc = tl.div_rn(acc, tl.load(den_ptr))
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def fused_mix(
    out: torch.Tensor, srcs: list[torch.Tensor], ws: torch.Tensor, den: torch.Tensor | None, block: int = 1024
) -> bool:
    """``out <- round(fma-accumulate(ws[j] * srcs[j]) / den)`` in one kernel; returns False (nothing done)
    where it does not apply: float64 anywhere, more than :data:`MAX_SOURCES` sources, or non-contiguous
    tensors. ``ws``: float32 tensor of the weights on ``out``'s device; ``den``: their float32 sum (one
    element) or None when it is 1. All tensors 1-D, same numel, same CUDA device."""
    if not (1 <= len(srcs) <= MAX_SOURCES) or out.dtype == torch.float64 or ws.dtype != torch.float32:
        return False
    if any(s.dtype == torch.float64 or not s.is_contiguous() for s in srcs) or not out.is_contiguous():
        return False
    n = out.numel()
    if any(s.numel() != n or s.device != out.device for s in srcs) or ws.device != out.device:
        raise ValueError("fused_mix: sources, weights and output must have one size and one device")
    ptrs = list(srcs) + [srcs[0]] * (MAX_SOURCES - len(srcs))
    # what Triton specialises on (dtypes, constexprs, 16-divisibility of sizes and pointers)
    spec = (len(srcs), den is not None, block, n % 16 == 0, n >= 2**31, *ptr_spec(out, *srcs))
    meta = {"N_SRC": len(srcs), "HAS_DEN": den is not None, "BLOCK": block}
    args = (out, *ptrs, ws, den if den is not None else ws, n)
    launch(_mix_kernel, (triton.cdiv(n, block),), spec, out.device, *args, **meta)
    return True


def ptr_spec(*tensors: torch.Tensor) -> tuple:
    """The part of a launch's specialisation key that its tensor arguments give: dtype and 16-byte alignment."""
    return tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors)


def launch(kernel, grid: tuple[int, ...], spec: tuple, device: torch.device, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on ``device``; the first launch of each specialisation ``spec`` (what
    Triton compiles for: dtypes, constexprs, alignments) holds a process-wide lock, since Triton's JIT is not
    safe to enter from several threads; later launches of it take no lock."""
    key = (kernel, device, spec)
    with torch.cuda.device(device):  # Triton launches on the current device, not the tensors'
        if key in _READY:
            kernel[grid](*args, **meta)
            return
        with _FIRST_LAUNCH:  # a first launch may compile: one thread at a time (Remixers on several GPUs)
            kernel[grid](*args, **meta)
            _READY.add(key)
