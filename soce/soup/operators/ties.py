"""``ties``: trim, elect sign, disjoint mean (Yadav et al. 2023), as mergekit 0.1.5 computes it.

Per tensor, in the working dtype (float32; float64 if an input is float64):

1. **Trim** (:func:`trim_mask`, needs the whole tensor, so it is done per tensor, never per chunk): each task
   vector ``tau_j = M_j - base`` keeps its ``k = max(1, int(density * numel))`` largest magnitudes, the others
   become 0 (``density >= 1``: nothing trimmed). The k are chosen as mergekit chooses them:
   ``torch.argsort(|tau_j|.float(), descending=True)[:k]`` on the CPU, so that equal magnitudes at the cut
   (frequent: bf16 weights take few values) fall the same way; :mod:`.sort_cut` finds that set without
   sorting. The mask does not depend on the weights: the in-memory re-mix computes it once per expert and
   keeps it as bits.
2. ``tau_j *= w_j``.
3. **Elect** (:func:`elect`, elementwise): ``s = sum_j tau_j``; the sign is +1 where ``s >= 0``, else -1;
   ``mixed = sum_j tau_j [sign(tau_j) == sign]``, ``divisor = sum_j w_j [sign(tau_j) == sign]`` (0 -> 1),
   each sum from +0 in candidate order.
4. ``normalize`` (default on): ``mixed /= divisor``; ``mixed *= lambda`` unless 1; ``out = round(base + mixed)``.

See :mod:`.task_arithmetic` for the order of the sums (equal to mergekit's for up to 4 task vectors).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from soce.soup.operators import sort_cut


def trim_k(density: float, numel: int) -> int:
    """How many entries TIES keeps: ``max(1, int(density * numel))`` (mergekit's formula); all for
    ``density >= 1``, none for ``density <= 0`` or an empty tensor."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def trim_mask(keys: torch.Tensor, density: float) -> torch.Tensor | None:
    """Bool mask (1-D, CPU) of the entries TIES keeps of one whole task vector, given the keys of its
    magnitudes ``|tau|`` as float32 (:func:`.sort_cut.pack`; mergekit sorts float32 magnitudes, also for
    float64 inputs); None when it keeps all. The kept entries are those of torch's CPU
    ``argsort(descending=True)[:k]``, as mergekit 0.1.5 picks them (equal magnitudes at the cut fall the same
    way), found by :func:`.sort_cut.first_k` without sorting; ``keys`` is rearranged: its first
    :func:`trim_k` entries are the kept ones."""
    n = keys.numel()
    k = trim_k(density, n)
    if k == n:
        return None
    if not k:
        return torch.zeros(n, dtype=torch.bool)
    return sort_cut.first_k(keys, k)


def elect(
    deltas: list[torch.Tensor],
    ws: list[torch.Tensor],
    scratch: Callable[[str, torch.dtype, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' sign election and disjoint sum on one chunk: ``deltas`` (weighted task vectors, 1-D, working
    dtype, same device) and ``ws`` (their weights, one-element tensors) -> (``mixed``, ``divisor``). Both
    sums start at +0 and add in candidate order; a zero divisor becomes 1. ``scratch(name, dtype, n)``
    gives the buffers (default: new tensors)."""
    dt, n, dev = deltas[0].dtype, deltas[0].numel(), deltas[0].device
    get = scratch or (lambda name, dtype, k: torch.empty(k, dtype=dtype, device=dev))
    s = get("tv_s", dt, n).zero_()
    for d in deltas:
        s.add_(d)
    agree = get("tv_agree", torch.bool, n)
    sign = get("tv_sign", dt, n).copy_(torch.ge(s, 0, out=agree)).mul_(2).sub_(1)
    mixed, divisor, t = s.zero_(), get("tv_div", dt, n).zero_(), get("tv_t", dt, n)
    for d, w in zip(deltas, ws, strict=True):
        torch.eq(torch.sign(d, out=t), sign, out=agree)
        mixed.add_(torch.mul(d, agree, out=t))
        divisor.add_(torch.mul(w, agree, out=t))
    divisor.masked_fill_(divisor == 0, 1)  # (no host sync on a GPU, unlike divisor[divisor == 0] = 1)
    return mixed, divisor
