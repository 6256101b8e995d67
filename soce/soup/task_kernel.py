"""Fused GPU re-mix of the task-vector operators: one Triton kernel per tensor, bit for bit what
:func:`soce.soup.operators.task_vectors.mix_chunk` computes for ``task_arithmetic`` and ``ties``.

``mix_chunk`` runs about 30 torch kernels per chunk on float32 temporaries (each task vector, the sign sum,
the agreement masks): on an H100 a TIES re-mix took 33-42x the time of a linear one. This kernel reads the base and
each expert once (and TIES' kept-entry bits, 1/8 byte per element and expert), keeps every intermediate in
registers and writes the soup once: for three bf16 experts ~10.4 bytes per element against the linear
kernel's 8. Same operations, same order, each one IEEE float32 operation (no fused multiply-add: the
kernel is compiled with ``enable_fp_fusion=False``; division by ``div_rn``), then one round-to-nearest-even
to the output dtype:

``d_j = x_j - b``; ``d_j *= keep_j`` (TIES' trim bit, as 0.0/1.0); ``d_j *= scale_j`` (rescale factor);
``d_j *= w_j``; consensus (``ties``): ``s = +0 + d_1 + ... + d_n``, ``sign = s >= 0 ? 1 : -1``, ``a_j =
(sgn(d_j) == sign)``, ``mixed = +0 + d_1 a_1 + ...``, ``den = +0 + w_1 a_1 + ...`` (0 -> 1); otherwise
``mixed = +0 + d_1 + ... + d_n``, ``den`` = the weights' sum; ``mixed /= den`` (``normalize``);
``mixed *= lambda`` (unless 1); ``out = round(b + mixed)``.

DARE's random masks are left to ``mix_chunk`` (:func:`applies` says no). :class:`soce.soup.Remixer` uses the
kernel where it applies and the tensors are on a CUDA device (``SOCE_FUSED_MIX=0`` turns it off, as for the
linear kernel); ``tests/test_operators.py`` checks it bitwise against ``mix_chunk`` where a GPU is present.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soce.soup.kernel import MAX_SOURCES, available, launch, ptr_spec, triton
from soce.soup.operators.spec import MergeSpec
from soce.soup.operators.task_arithmetic import weight_divisor

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _weighted_delta(x_ptr, m_ptr, offs, pos, inb, b, w, scale, MASKED: tl.constexpr, SCALED: tl.constexpr):
        """One expert's weighted task vector on a block: ``((x - b) * keep) * scale * w``, one rounding each."""
        d = tl.load(x_ptr + offs, mask=inb).to(tl.float32) - b
        if MASKED:
            byte = tl.load(m_ptr + (pos >> 3), mask=inb).to(tl.int32)
            d = d * ((byte >> (pos & 7).to(tl.int32)) & 1).to(tl.float32)
        if SCALED:
            d = d * scale
        return d * w

    @triton.jit
    def _agree(d, w, sign, mixed, den):
        """TIES' disjoint sums, one expert: its entries whose sign is the elected one, and their weights."""
        a = (tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)) == sign).to(tl.float32)
        return mixed + d * a, den + w * a

    @triton.jit
    def _task_kernel(
        out_ptr, base_ptr,
        x0, x1, x2, x3, x4, x5, x6, x7,
        m0, m1, m2, m3, m4, m5, m6, m7,
        w0, w1, w2, w3, w4, w5, w6, w7,
        s0, s1, s2, s3, s4, s5, s6, s7,
        div, lam, start, n,
        N_SRC: tl.constexpr, MASKS: tl.constexpr, SCALES: tl.constexpr, CONSENSUS: tl.constexpr,
        NORMALIZE: tl.constexpr, HAS_LAM: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        pos = offs + start  # position in the whole tensor: where the trim bits are
        b = tl.load(base_ptr + offs, mask=inb).to(tl.float32)
        zero = tl.zeros([BLOCK], dtype=tl.float32)
        d0 = _weighted_delta(x0, m0, offs, pos, inb, b, w0, s0, MASKS & 1, SCALES & 1)
        if N_SRC > 1:
            d1 = _weighted_delta(x1, m1, offs, pos, inb, b, w1, s1, MASKS & 2, SCALES & 2)
        if N_SRC > 2:
            d2 = _weighted_delta(x2, m2, offs, pos, inb, b, w2, s2, MASKS & 4, SCALES & 4)
        if N_SRC > 3:
            d3 = _weighted_delta(x3, m3, offs, pos, inb, b, w3, s3, MASKS & 8, SCALES & 8)
        if N_SRC > 4:
            d4 = _weighted_delta(x4, m4, offs, pos, inb, b, w4, s4, MASKS & 16, SCALES & 16)
        if N_SRC > 5:
            d5 = _weighted_delta(x5, m5, offs, pos, inb, b, w5, s5, MASKS & 32, SCALES & 32)
        if N_SRC > 6:
            d6 = _weighted_delta(x6, m6, offs, pos, inb, b, w6, s6, MASKS & 64, SCALES & 64)
        if N_SRC > 7:
            d7 = _weighted_delta(x7, m7, offs, pos, inb, b, w7, s7, MASKS & 128, SCALES & 128)
        mixed = zero + d0  # the sums start at +0, as torch's do (+0 + -0 is +0)
        if N_SRC > 1:
            mixed = mixed + d1
        if N_SRC > 2:
            mixed = mixed + d2
        if N_SRC > 3:
            mixed = mixed + d3
        if N_SRC > 4:
            mixed = mixed + d4
        if N_SRC > 5:
            mixed = mixed + d5
        if N_SRC > 6:
            mixed = mixed + d6
        if N_SRC > 7:
            mixed = mixed + d7
        den = zero + div
        if CONSENSUS:
            sign = tl.where(mixed >= 0, 1.0, -1.0)
            mixed, den = _agree(d0, w0, sign, zero, zero)
            if N_SRC > 1:
                mixed, den = _agree(d1, w1, sign, mixed, den)
            if N_SRC > 2:
                mixed, den = _agree(d2, w2, sign, mixed, den)
            if N_SRC > 3:
                mixed, den = _agree(d3, w3, sign, mixed, den)
            if N_SRC > 4:
                mixed, den = _agree(d4, w4, sign, mixed, den)
            if N_SRC > 5:
                mixed, den = _agree(d5, w5, sign, mixed, den)
            if N_SRC > 6:
                mixed, den = _agree(d6, w6, sign, mixed, den)
            if N_SRC > 7:
                mixed, den = _agree(d7, w7, sign, mixed, den)
            den = tl.where(den == 0, 1.0, den)
        if NORMALIZE:
            mixed = tl.div_rn(mixed, den)
        if HAS_LAM:
            mixed = mixed * lam
        tl.store(out_ptr + offs, (b + mixed).to(out_ptr.dtype.element_ty), mask=inb)


@dataclass(frozen=True)
class TaskScalars:
    """One soup's numbers for the kernel, as the float32 values ``mix_chunk`` uses (exact as Python floats):
    the weights, the weights' sum (non-consensus operators with ``normalize``; else 1), lambda."""

    ws: tuple[float, ...]
    divisor: float
    lam: float

    @staticmethod
    def make(spec: MergeSpec, weights: list[float]) -> TaskScalars:
        ws = tuple(torch.tensor(weights, dtype=torch.float32).tolist())
        div = 1.0 if spec.op.consensus else float(weight_divisor(weights, torch.float32))
        return TaskScalars(ws, div, float(torch.tensor(spec.lam, dtype=torch.float32)))


def applies(spec: MergeSpec, device: torch.device, n_sources: int, salts: list) -> bool:
    """Whether :func:`fused_task` can compute this soup on ``device``: a CUDA device with Triton (not turned
    off), 1 to :data:`MAX_SOURCES` experts, no DARE masks (``salts`` all None)."""
    return available(device) and 1 <= n_sources <= MAX_SOURCES and all(s is None for s in salts)


def fused_task(
    out: torch.Tensor,
    srcs: list[torch.Tensor],
    base: torch.Tensor,
    spec: MergeSpec,
    masks: list[torch.Tensor | None],
    scales: list[float | None],
    sc: TaskScalars,
    start: int = 0,
    block: int = 1024,
) -> bool:
    """``out`` <- what ``mix_chunk`` writes for elements [start, start+len) of one tensor, in one kernel;
    False (nothing done) where it does not apply: a float64 tensor (the working dtype would be float64) or a
    non-contiguous one. ``srcs``/``base``: that slice, 1-D; ``masks``: each expert's TIES bits for the WHOLE
    tensor (:func:`pack_bits`) or None; ``scales``: rescale factors (float32 values) or None. All on ``out``'s
    CUDA device. Call :func:`applies` first."""
    ts = [out, base, *srcs]
    if any(t.dtype == torch.float64 or not t.is_contiguous() for t in ts):
        return False
    n, k = out.numel(), len(srcs)
    if any(t.numel() != n or t.device != out.device for t in ts[1:]):
        raise ValueError("fused_task: sources, base and output must have one size and one device")
    pad = MAX_SOURCES - k
    xs = [*srcs, *[srcs[0]] * pad]
    ms = [m if m is not None else base for m in masks] + [base] * pad
    ws = [*sc.ws, *[0.0] * pad]
    ss = [1.0 if s is None else s for s in scales] + [1.0] * pad
    meta = {
        "N_SRC": k,
        "MASKS": sum(1 << j for j, m in enumerate(masks) if m is not None),
        "SCALES": sum(1 << j for j, s in enumerate(scales) if s is not None),
        "CONSENSUS": spec.op.consensus,
        "NORMALIZE": spec.do_normalize,
        "HAS_LAM": sc.lam != 1,
        "BLOCK": block,
        "enable_fp_fusion": False,  # mix_chunk rounds every product and sum on its own
    }
    # what Triton specialises on: constexprs, sizes' 16-divisibility and width, pointers' dtypes and alignment
    key = (*meta.values(), n % 16 == 0, n == 1, n >= 2**31, start % 16 == 0, start >= 2**31, *ptr_spec(*ts, *ms))
    args = (out, base, *xs, *ms, *ws, *ss, sc.divisor, sc.lam, start, n)
    launch(_task_kernel, (triton.cdiv(n, block),), key, out.device, *args, **meta)
    return True
