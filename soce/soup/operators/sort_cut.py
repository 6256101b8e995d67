"""Which entries torch's CPU ``argsort(descending=True)`` puts in its first ``k`` places, without sorting.

TIES' trim keeps the ``k`` largest magnitudes of a task vector as mergekit 0.1.5 picks them:
``torch.argsort(|tau|.float(), descending=True)[:k]``. That sort is unstable (libstdc++'s ``std::sort``,
an introsort), so among equal magnitudes at the cut (frequent: bf16 weights take few values) *which*
entries are kept depends on its exact sequence of swaps. Sorting 33M magnitudes takes seconds on one core;
but only the partitions that contain position ``k`` decide that set: an introsort partition never moves an
entry across its cut again, and the final insertion sort is stable within the runs the partitions leave.

So :func:`first_k` replays ``std::sort`` (``__introsort_loop`` with the median-of-three pivot and the
unguarded Hoare partition, then the final insertion sort) on the side of each cut that holds ``k`` only,
vectorised: the i-th entry from the left that is not greater than the pivot swaps with the i-th entry from
the right that is not smaller, while the first lies left of the second. About 4-5x faster than the sort
(most of a sort's work is ordering ranges far from the cut) and 8 bytes per entry instead of 12.

Keys pack an entry: ``float32 bits of |tau| << 32 | position``; for non-negative floats the bits order as the
values do, and ``std::sort``'s swaps depend only on comparisons, so the replay moves keys exactly as torch
moves (value, index) pairs. The replay checks itself once per process against this torch's ``argsort``
(:func:`replay_matches_torch`); where it differs (another sort in a future torch), where the introsort
would switch to heapsort (recursion depth limit), for NaN magnitudes or for 2^32 entries or more,
:func:`first_k` sorts with torch instead: the same result, slower.
"""

from __future__ import annotations

import functools
import logging
import threading

import numpy as np
import torch

log = logging.getLogger(__name__)

THRESHOLD = 16  # libstdc++'s _S_threshold: ranges this short are left to the final insertion sort
SCAN = 1 << 16  # entries compared per step of a partition's scan (cache-sized, any value gives the same keys)
POSITION = np.int64(0xFFFFFFFF)
NAN_BITS = 0x7F800000  # |x| bits above this are NaN
_LOCAL = threading.local()


def key_buffer(n: int) -> torch.Tensor:
    """An int64 buffer of ``n`` keys kept per thread (grown, never shrunk): a trim per task vector would
    otherwise fault in 8 fresh bytes per entry each time."""
    buf = getattr(_LOCAL, "keys", None)
    if buf is None or buf.numel() < n:
        buf = _LOCAL.keys = torch.empty(n, dtype=torch.int64)
    return buf[:n]


def pack(magnitude: torch.Tensor, start: int, out: torch.Tensor) -> None:
    """``out`` (int64, CPU, as long as ``magnitude``) <- the keys of entries ``start, start+1, ...``
    with magnitudes ``magnitude`` (float32, >= 0 or NaN, CPU)."""
    bits = magnitude.contiguous().view(torch.int32).numpy()
    o = out.numpy()
    np.left_shift(bits, 32, out=o, dtype=np.int64)
    o |= np.arange(start, start + o.size, dtype=np.int64)


def first_k(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` entries ``torch.argsort(magnitudes, descending=True)[:k]`` selects, given all
    entries' keys (int64, 1-D, CPU, from :func:`pack`, any order). Rearranges ``keys`` so that ``keys[:k]``
    are the kept entries (their magnitudes: :func:`values`)."""
    n = keys.numel()
    w = keys.numpy()
    if not _replayable(w, n) or not _replay(w, k):
        _sort(keys)
    return torch.from_numpy(_mask(w, k))


def values(keys: torch.Tensor) -> torch.Tensor:
    """The float32 magnitudes packed in ``keys`` (a new tensor)."""
    return (keys >> 32).to(torch.int32).view(torch.float32)


def _replayable(w: np.ndarray, n: int) -> bool:
    return n < (1 << 32) and replay_matches_torch() and (n == 0 or int(w.max()) >> 32 <= NAN_BITS)


def _replay(w: np.ndarray, k: int) -> bool:
    """``std::sort``'s introsort on the ranges that hold position ``k``, then its insertion sort on the last
    one; False (keys partly moved) where the sort would switch to heapsort."""
    lo, hi = 0, w.size
    depth = depth_limit(w.size)
    while hi - lo > THRESHOLD:
        if depth == 0:
            return False
        depth -= 1
        cut = lo + _partition(w[lo:hi])
        if cut == k:
            return True
        lo, hi = (cut, hi) if cut < k else (lo, cut)
    run = w[lo:hi]
    run[:] = run[np.argsort(-(run >> 32), kind="stable")]  # insertion sort: stable
    return True


def depth_limit(n: int) -> int:
    """Partitions before ``std::sort`` switches a range to heapsort: ``std::__lg(n) * 2``."""
    return 2 * (n.bit_length() - 1)


def _median_to_first(w: np.ndarray) -> None:
    """``__move_median_to_first(first, first + 1, mid, last - 1)`` for the descending comparison."""
    n = w.size
    a, b, c = 1, n // 2, n - 1
    va, vb, vc = w[a] >> 32, w[b] >> 32, w[c] >> 32
    if va > vb:
        m = b if vb > vc else (c if va > vc else a)
    else:
        m = a if va > vc else (c if vb > vc else b)
    w[0], w[m] = w[m], w[0]


def _partition(w: np.ndarray) -> int:
    """``__unguarded_partition_pivot`` on ``w`` in place (descending); returns the cut. Entries left of it
    are >= the pivot, right of it <= the pivot."""
    _median_to_first(w)
    p = int(w[0] >> 32)
    lefts, rights = _stops_left(w, (p + 1) << 32), _stops_right(w, p << 32)
    left, right, last_right = next(lefts, None), next(rights), w.size
    while left is not None:
        t = min(left.size, right.size)
        a, b = left[:t], right[:t]
        swaps = int(np.count_nonzero(a < b))  # a rises, b falls: a prefix of the pairs
        if swaps:
            a_, b_ = a[:swaps], b[:swaps]
            w[a_], w[b_] = w[b_], w[a_].copy()
            last_right = int(b_[-1])
        if swaps < t:
            return min(int(a[swaps]), last_right)
        left, right = left[t:], right[t:]
        if not left.size:
            left = next(lefts, None)
        if not right.size:
            right = next(rights)  # position 0 (the pivot) stops every right scan
    return last_right


def _stops_left(w: np.ndarray, above: int):
    """Positions >= 1 where the left scan stops (value <= pivot: key < ``above``), rising, in blocks."""
    for s in range(1, w.size, SCAN):
        found = np.flatnonzero(w[s : s + SCAN] < above)
        if found.size:
            yield found + s


def _stops_right(w: np.ndarray, below: int):
    """Positions where the right scan stops (value >= pivot: key >= ``below``), falling, in blocks."""
    for e in range(w.size, 0, -SCAN):
        s = max(0, e - SCAN)
        found = np.flatnonzero(w[s:e] >= below)
        if found.size:
            yield found[::-1] + s


def _sort(keys: torch.Tensor) -> None:
    """The fallback: ``keys`` rearranged in the order torch's own ``argsort(descending=True)`` gives."""
    pos = keys & int(POSITION)
    mags = torch.empty(keys.numel(), dtype=torch.float32)
    mags[pos] = values(keys)
    order = torch.argsort(mags, descending=True)
    keys.copy_((mags[order].view(torch.int32).to(torch.int64) << 32) | order)


@functools.cache
def replay_matches_torch() -> bool:
    """Whether the replay selects what this torch's CPU ``argsort(descending=True)`` selects, on tied
    random magnitudes of several sizes and cuts (checked once per process, ~20 ms)."""
    g = torch.Generator().manual_seed(0)
    for n, levels in ((40, 3), (1000, 7), (20_011, 50), (70_001, 500)):
        mags = torch.randint(0, levels, (n,), generator=g).float()
        for k in (1, n // 3, n // 2, n - 1):
            want = torch.zeros(n, dtype=torch.bool)
            want[torch.argsort(mags, descending=True)[:k]] = True
            keys = torch.empty(n, dtype=torch.int64)
            pack(mags, 0, keys)
            w = keys.numpy()
            if not _replay(w, k) or not np.array_equal(_mask(w, k), want.numpy()):
                log.warning("torch's CPU sort is not the introsort soce replays: TIES trims by sorting (same bits)")
                return False
    return True


def _mask(w: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the positions packed in ``w[:k]`` (in blocks: no key-sized temporaries)."""
    mask = np.zeros(w.size, dtype=np.bool_)
    for s in range(0, k, 1 << 20):
        mask[w[s : min(k, s + (1 << 20))] & POSITION] = True
    return mask
