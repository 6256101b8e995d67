"""``task_arithmetic``: ``base + lambda * sum_j w_j * tau_j``, ``tau_j = M_j - base`` (Ilharco et al. 2023).

The steps, in mergekit 0.1.5's order (its ``GeneralizedTaskArithmeticMerge`` without consensus), in the
working dtype (float32; float64 if an input is float64), each a single IEEE operation:
``tau_j = M_j - base``; ``tau_j *= w_j`` (weights as working-dtype numbers); ``mixed = sum_j tau_j`` from
+0 in candidate order; with ``normalize``: ``mixed /= sum_j w_j`` (that sum replaced by 1 when below 1e-8);
if ``lambda != 1``: ``mixed *= lambda``; ``out = round(base + mixed)``, the one rounding to the output dtype.

Order of the sums: torch's CPU ``sum(dim=0)`` (what mergekit calls) adds the candidates one by one from +0
for up to 4 task vectors, and for more on all elements of a tensor but its last ``numel % 32`` (AVX2;
64 with AVX-512), which it adds in another order. soce always adds one by one (CPU and GPU), so its bits
equal mergekit's for up to 4 task vectors, and for more on every tensor whose size is a multiple of 64
(every weight matrix and norm of Llama-family models).
"""

from __future__ import annotations

import torch


def plain_sum(deltas: list[torch.Tensor], into: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_j deltas[j]``: +0 plus each in order (one rounding per addition), in ``into`` (default: new)."""
    mixed = torch.zeros_like(deltas[0]) if into is None else into.zero_()
    for d in deltas:
        mixed.add_(d)
    return mixed


def weight_divisor(weights: list[float], acc: torch.dtype) -> torch.Tensor:
    """The normalising divisor of the non-consensus operators, as mergekit computes it on the CPU: the
    weights as ``acc`` numbers summed by torch (one element), replaced by 1 when its magnitude is below
    1e-8."""
    w = torch.tensor(weights, dtype=acc).reshape(len(weights), 1)
    div = w.sum(dim=0)
    div[div.abs() < 1e-8] = 1
    return div


def finish(
    out: torch.Tensor, base: torch.Tensor, mixed: torch.Tensor, divisor: torch.Tensor | None, lam: float
) -> None:
    """``out <- round(base + lambda * mixed / divisor)`` in mergekit's order: the division (when
    ``divisor`` is given: ``normalize``), the product with ``lambda`` (skipped when it is 1, as mergekit
    does), the sum with the base, then one rounding to ``out``'s dtype. ``mixed`` is overwritten."""
    if divisor is not None:
        mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    torch.add(base, mixed, out=mixed)
    out.copy_(mixed)
