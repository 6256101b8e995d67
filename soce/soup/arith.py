"""The soup arithmetic: fma from +0 in candidate order, one division, one rounding (bit-exact with mergekit)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

CHUNK_ELEMS = 1 << 18  # elements per arithmetic chunk on CPU: 1 MiB of float32 accumulator, stays in L2
GPU_CHUNK_ELEMS = 1 << 26  # on GPU without the fused kernel (soce/soup/kernel.py): fewer, larger torch kernels


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


@dataclass(frozen=True)
class Coefficients:
    """Weights as accumulation-dtype tensors on one device: ``ws[j]`` has one element (so that it takes part
    in type promotion), ``den`` is their sum, or None when it is exactly 1 (or ``normalize`` is off)."""

    ws: list[torch.Tensor]
    den: torch.Tensor | None
    zero: torch.Tensor  # one +0.0 element: the accumulator's start, broadcast

    @staticmethod
    def make(
        weights: list[float], acc: torch.dtype, device: torch.device | str = "cpu", normalize: bool = True
    ) -> Coefficients:
        w = torch.tensor(weights, dtype=acc)
        den = w.sum()
        keep = normalize and bool(den != 1)
        return Coefficients(
            [w[j : j + 1].to(device) for j in range(len(weights))],
            den.reshape(1).to(device) if keep else None,
            torch.zeros(1, dtype=acc, device=device),
        )


def mix_into(
    out: torch.Tensor, srcs: list[torch.Tensor], co: Coefficients, acc: torch.Tensor, tmp: torch.Tensor | None = None
) -> None:
    """``out <- round(fma-accumulate(ws[j] * srcs[j]) / den)``: ``acc`` (accumulation dtype) starts at +0 and
    takes ``acc += w_j * src_j`` with one rounding per step (``addcmul_``, a fused multiply-add on CPU and
    GPU), in candidate order; then the division by the weights' sum when it is not 1, then one rounding to
    ``out``'s dtype. All tensors 1-D with the same numel, on one device. This order defines the soup's bits
    (and matches mergekit 0.1.5's linear merge). ``tmp`` (like ``acc``): when given, sources of another dtype
    are converted into it first (exact), which spares torch's CPU kernels a temporary allocation."""
    for j, (src, w) in enumerate(zip(srcs, co.ws, strict=True)):
        if tmp is not None and src.dtype != acc.dtype:
            tmp.copy_(src)
            src = tmp
        if j > 0:
            acc.addcmul_(src, w)
        elif acc.is_cuda:
            torch.addcmul(co.zero, src, w, out=acc)  # = acc.zero_().addcmul_(src, w) in one kernel
        else:
            acc.zero_().addcmul_(src, w)  # (a broadcast input is slower on CPU)
    if co.den is not None:
        acc.div_(co.den)
    out.copy_(acc)


def nonfinite_at(out: torch.Tensor, acc: torch.Tensor, srcs: list[torch.Tensor]) -> int | None:
    """Index of the first NaN/inf element of a soup chunk just computed by :func:`mix_into`, or None.

    Cheap when every element is finite: one sum of the accumulator (a NaN or inf anywhere makes it NaN or
    inf; the weights are > 0), plus one float32 sum of ``out`` when its dtype differs from a source's (the
    final rounding may overflow a narrower dtype). The elementwise test runs only when a sum is not finite
    (which finite values that overflow the sum also trigger)."""
    for t in (acc, out) if any(s.dtype != out.dtype for s in srcs) else (acc,):
        if not torch.isfinite(t.sum(dtype=torch.float32 if t.dtype.itemsize == 2 else None)):
            bad = (~torch.isfinite(t)).nonzero()
            if len(bad):
                return int(bad[0])
    return None


def reference_soup(
    tensors: list[torch.Tensor], weights: list[float], dtype: torch.dtype | None = None, normalize: bool = True
) -> torch.Tensor:
    """Plain torch reference of one soup tensor, written independently of the streaming code: float32
    (float64 for float64 inputs) fused multiply-add accumulation from zero in order, divided by the weights'
    float32 sum unless that is 1, rounded to ``dtype`` (default: the inputs' dtype)."""
    acc_dt = _acc_dtype(*(t.dtype for t in tensors))
    w = torch.tensor(weights, dtype=acc_dt)
    acc = torch.zeros(tensors[0].shape, dtype=acc_dt)
    for t, wj in zip(tensors, w.unbind(0), strict=True):
        acc.addcmul_(t, wj.reshape([1] * t.dim()))
    if normalize and w.sum() != 1:
        acc /= w.sum()
    return acc.to(dtype or tensors[0].dtype)


def _chunks(numel: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, numel, size):
        yield s, min(size, numel - s)
