"""``dare_linear`` / ``dare_ties``: drop and rescale (Yu et al. 2024), with reproducible masks.

Each task vector ``tau_j = M_j - base`` keeps each entry with probability ``density`` (``density >= 1``:
all, no rescale); with ``rescale`` (the default) the kept entries are multiplied by
``||tau_j||_1 / ||kept||_1`` (mergekit 0.1.5's L1 rescale; skipped when either norm is below 1e-7). Then as
``task_arithmetic`` (``dare_linear``) or as TIES' election (``dare_ties``).

The masks are not drawn from a random generator's stream: entry ``i`` of tensor ``key`` of candidate ``name``
is kept when ``h(i) < density * 2**32``, ``h`` a 32-bit integer hash (Mueller's) of ``i`` salted with a
digest of (``seed``, ``key``, ``name``). So a mask is the same on CPU and GPU, in every run and for any
chunking (each chunk computes its own part), and the same tensor of the same candidate gets the same mask
whatever the other candidates or weights. Given the masks, every operation is mergekit's.

The L1 norms are summed exactly (integer sums of mantissas per exponent) and rounded once to the working
dtype, so the rescale factor is the same on every device and for any chunking. (mergekit sums in float32 in
torch's order; its factor can differ from the exact one in the last bit.)
"""

from __future__ import annotations

import hashlib
import math

import torch

M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**59, exact in int64 on every device
EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale when a norm is below this


def salt(seed: int, key: str, name: str) -> tuple[int, int]:
    """Two 32-bit salts for the mask of tensor ``key`` of candidate ``name`` (blake2b of the three)."""
    h = hashlib.blake2b(f"{seed}\x00{key}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = ((x >> 16) ^ x).mul_(_MUL).bitwise_and_(M32)
    x = ((x >> 16) ^ x).mul_(_MUL).bitwise_and_(M32)
    return (x >> 16) ^ x


def keep_mask(
    s: tuple[int, int], density: float, start: int, count: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool mask of elements [start, start+count) of one tensor: kept with probability
    ``floor(density * 2**32) / 2**32``; identical on every device."""
    i = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = _mix32((i & M32) ^ s[0])
    x = _mix32(x ^ (i >> 32) ^ s[1])
    return x < min(int(density * 2**32), 2**32)


def l1_parts(t: torch.Tensor) -> torch.Tensor:
    """Exact partial L1 norm of a float32/float64 tensor, as integer sums per exponent: int64 [bins, 2]
    (high and low halves of the mantissas). Add the parts of several chunks, then :func:`l1_value`.
    Any device; integer sums, so the result does not depend on the order."""
    if t.dtype == torch.float32:
        bits = t.reshape(-1).view(torch.int32).to(torch.int64) & 0x7FFFFFFF
        mbits, bins = 23, 256
    else:
        bits = t.reshape(-1).view(torch.int64) & 0x7FFFFFFFFFFFFFFF
        mbits, bins = 52, 2048
    e = bits >> mbits
    m = (bits & ((1 << mbits) - 1)) | ((e > 0).to(torch.int64) << mbits)  # implicit leading 1
    e = e.clamp_(min=1)  # subnormals scale like exponent 1
    out = torch.zeros(bins, 2, dtype=torch.int64, device=t.device)
    out[:, 0].index_add_(0, e, m >> 26)
    out[:, 1].index_add_(0, e, m & ((1 << 26) - 1))
    return out


def l1_value(parts: torch.Tensor, dtype: torch.dtype) -> float:
    """The L1 norm from :func:`l1_parts`, rounded once (to nearest, ties to even) to ``dtype``'s precision
    (float32 or float64; inf/NaN entries give NaN). Exact for normal results."""
    p = parts.cpu().tolist()
    top, mbits, bias = (255, 23, 150) if dtype == torch.float32 else (2047, 52, 1075)
    if p[top][0] or p[top][1]:
        return float("nan")
    total = sum(((hi << 26) + lo) << (e - 1) for e, (hi, lo) in enumerate(p) if e and (hi or lo))
    shift = max(0, total.bit_length() - (mbits + 1))
    if shift:
        q, r = divmod(total, 1 << shift)
        half = 1 << (shift - 1)
        total = q + (r > half or (r == half and q & 1))
    try:
        return math.ldexp(total, shift + 1 - bias)
    except OverflowError:
        return float("inf")


def rescale_factor(before: float, after: float, dtype: torch.dtype) -> torch.Tensor | None:
    """mergekit's L1 rescale ``before / after`` as a one-element ``dtype`` tensor (the division done in
    ``dtype``), or None when either norm is below 1e-7 (no rescale)."""
    b, a = torch.tensor([before], dtype=dtype), torch.tensor([after], dtype=dtype)
    if bool(b < EPS) or bool(a < EPS) or not (bool(torch.isfinite(b)) and bool(torch.isfinite(a))):
        return None
    return b / a
