"""What the engines call for the task-vector operators: one :func:`prepare` per tensor, one
:func:`mix_chunk` per chunk, weights as :class:`TaskCoefficients` (per soup).

:func:`prepare` does what needs a whole tensor and does not depend on the weights (TIES' trim masks, kept as
bits; DARE's mask salts; the L1 rescale factors), so an in-memory re-mix does it once per expert.
:func:`mix_chunk` is elementwise: any chunking, any device gives the same bits (every step is one IEEE
operation done by torch in the working dtype; no fused multiply-add).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from soce.soup.operators import dare, sort_cut, ties
from soce.soup.operators.spec import MergeSpec
from soce.soup.operators.task_arithmetic import finish, plain_sum, weight_divisor

Reader = Callable[[int, int, int], torch.Tensor]  # (candidate index or -1 for the base, start, count) -> 1-D


@dataclass
class Prepared:
    """One tensor's per-candidate extras, in the order of the candidates that take part: TIES' trim mask
    as packed bits (uint8, whole tensor) or None; DARE's mask salts or None; the rescale factor (working
    dtype, one element) or None."""

    masks: list[torch.Tensor | None]
    salts: list[tuple[int, int] | None]
    scales: list[torch.Tensor | None]

    def to(self, device: torch.device | str) -> Prepared:
        """The same on ``device`` (masks and factors moved; identical bits)."""
        mv = [None if t is None else t.to(device) for t in self.masks]
        return Prepared(mv, self.salts, [None if t is None else t.to(device) for t in self.scales])


@dataclass(frozen=True)
class TaskCoefficients:
    """One soup's weights on one device: ``ws[j]`` one-element working-dtype tensors (mergekit rounds the
    weights to the working dtype); ``divisor``: the weights' sum for the non-consensus operators (None for
    the consensus ones, whose divisor is per element)."""

    ws: list[torch.Tensor]
    divisor: torch.Tensor | None

    @staticmethod
    def make(
        spec: MergeSpec, weights: list[float], acc: torch.dtype, device: torch.device | str = "cpu"
    ) -> TaskCoefficients:
        w = torch.tensor(weights, dtype=acc)
        div = None if spec.op.consensus else weight_divisor(weights, acc).to(device)
        return TaskCoefficients([w[j : j + 1].to(device) for j in range(len(weights))], div)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return s


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool 1-D -> uint8 bits (element i is bit i % 8 of byte i // 8)."""
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, -mask.numel() % 8)).view(-1, 8)
    return (m << _shifts(m.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """Elements [start, start+count) of a :func:`pack_bits` mask, as bool on ``device``."""
    a, b = start // 8, -(-(start + count) // 8)
    p = packed[a:b].to(device, non_blocking=True)
    bits = (p.unsqueeze(1) >> _shifts(p.device)) & 1
    return bits.view(-1)[start - 8 * a : start - 8 * a + count].bool()


def _delta(read: Reader, j: int, start: int, count: int, acc: torch.dtype) -> torch.Tensor:
    return read(j, start, count).to(acc) - read(-1, start, count).to(acc)


def prepare(
    spec: MergeSpec,
    key: str,
    names: list[str],
    read: Reader,
    numel: int,
    acc: torch.dtype,
    chunk: int = 1 << 22,
    release: Callable[[int, int, int], None] | None = None,
) -> Prepared:
    """Per-candidate extras of tensor ``key`` (``numel`` elements) for candidates ``names`` (read by index
    with ``read``; -1 is the base), read in chunks of ``chunk`` elements (``release(j, start, count)``, when
    given, is called after each). TIES holds one whole task vector's magnitude keys at a time (8 bytes an entry,
    on the CPU); DARE holds nothing whole. Masks and factors land on the CPU."""
    op, n = spec.op, len(names)
    prep = Prepared([None] * n, [None] * n, [None] * n)
    if op.sparsify is None or spec.density >= 1:
        return prep
    for j, name in enumerate(names):
        if op.sparsify == "magnitude":
            prep.masks[j], prep.scales[j] = _trim(spec, read, j, numel, acc, chunk, release)
        else:
            prep.salts[j] = s = dare.salt(spec.seed, key, name)
            if spec.do_rescale:
                prep.scales[j] = _dare_factor(read, j, s, spec.density, numel, acc, chunk, release)
    return prep


def _trim(
    spec: MergeSpec,
    read: Reader,
    j: int,
    numel: int,
    acc: torch.dtype,
    chunk: int,
    release: Callable[[int, int, int], None] | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """TIES' trim of candidate ``j``: (packed mask or None, rescale factor or None)."""
    keys = sort_cut.key_buffer(numel)  # per thread, reused: no fresh pages per task vector
    before = None
    for start in range(0, numel, chunk):
        count = min(chunk, numel - start)
        d = _delta(read, j, start, count, acc).abs_()
        if spec.do_rescale:
            p = dare.l1_parts(d)
            before = p if before is None else before + p
        # float32 as mergekit sorts them (rounded for float64 inputs)
        sort_cut.pack(d.to("cpu", torch.float32), start, keys[start : start + count])
        if release is not None:
            release(j, start, count)
    mask = ties.trim_mask(keys, spec.density)  # its first k keys are then the kept entries
    if mask is None:
        return None, None
    if before is None:
        return pack_bits(mask), None
    if acc == torch.float32:
        kept = keys[: ties.trim_k(spec.density, numel)]
        after = sum(dare.l1_parts(sort_cut.values(kept[s : s + chunk])) for s in range(0, kept.numel(), chunk))
    else:  # magnitudes in the working dtype, again
        after = sum(
            dare.l1_parts(d * mask[s : s + d.numel()].to(d.device))
            for s in range(0, numel, chunk)
            for d in [_delta(read, j, s, min(chunk, numel - s), acc).abs_()]
        )
    return pack_bits(mask), _factor(before, after, acc)


def _factor(before: torch.Tensor, after: torch.Tensor, acc: torch.dtype) -> torch.Tensor | None:
    return dare.rescale_factor(dare.l1_value(before, acc), dare.l1_value(after, acc), acc)


def _dare_factor(
    read: Reader,
    j: int,
    s: tuple[int, int],
    density: float,
    numel: int,
    acc: torch.dtype,
    chunk: int,
    release: Callable[[int, int, int], None] | None,
) -> torch.Tensor | None:
    before = after = None
    for start in range(0, numel, chunk):
        count = min(chunk, numel - start)
        d = _delta(read, j, start, count, acc)
        keep = dare.keep_mask(s, density, start, count, d.device)
        pb, pa = dare.l1_parts(d), dare.l1_parts(d * keep)
        before, after = (pb, pa) if before is None else (before + pb, after + pa)
        if release is not None:
            release(j, start, count)
    if before is None:
        return None
    return _factor(before, after, acc)


Scratch = Callable[[str, torch.dtype, int], torch.Tensor]  # (name, dtype, numel) -> a reusable 1-D buffer


def _fresh(device: torch.device) -> Scratch:
    return lambda name, dtype, n: torch.empty(n, dtype=dtype, device=device)


def mix_chunk(
    out: torch.Tensor,
    srcs: list[torch.Tensor],
    base: torch.Tensor,
    spec: MergeSpec,
    prep: Prepared,
    co: TaskCoefficients,
    start: int,
    scratch: Scratch | None = None,
) -> None:
    """``out`` <- the soup of elements [start, start+len) of one tensor: ``srcs`` (the candidates that take
    part, in order) and ``base``, 1-D, same device as ``out``; ``prep`` from :func:`prepare` for the same
    candidates; ``co`` on that device. mergekit 0.1.5's operations, in its order (module docs).
    ``scratch``: where the working buffers come from (named ``tv_*``; default: new tensors)."""
    acc, n = co.ws[0].dtype, out.numel()
    get = scratch or _fresh(out.device)
    b = get("tv_b", acc, n).copy_(base)
    deltas = []
    for j, x in enumerate(srcs):
        d = get(f"tv_d{j}", acc, n).copy_(x).sub_(b)
        if prep.masks[j] is not None:
            d.mul_(unpack_bits(prep.masks[j], start, n, d.device))
        elif prep.salts[j] is not None:
            d.mul_(dare.keep_mask(prep.salts[j], spec.density, start, n, d.device))
        if prep.scales[j] is not None:
            d.mul_(prep.scales[j])
        deltas.append(d.mul_(co.ws[j]))
    if spec.op.consensus:
        mixed, divisor = ties.elect(deltas, co.ws, get)
    else:
        mixed, divisor = plain_sum(deltas, get("tv_s", acc, n)), co.divisor
    finish(out, b, mixed, divisor if spec.do_normalize else None, spec.lam)


def merge_tensor(
    spec: MergeSpec,
    key: str,
    names: list[str],
    base: torch.Tensor,
    srcs: list[torch.Tensor],
    weights: list[float],
    dtype: torch.dtype | None = None,
    chunk: int = 1 << 18,
) -> torch.Tensor:
    """One soup tensor from whole tensors in memory (any shape, one device): what the engines compute for
    file key ``key`` with candidates ``names`` (their order) and ``weights`` (> 0), in chunks of ``chunk``
    elements. ``dtype``: output dtype (default: ``srcs[0]``'s)."""
    acc = torch.float64 if torch.float64 in {base.dtype, *(s.dtype for s in srcs)} else torch.float32
    flat = [s.reshape(-1) for s in srcs]
    fb = base.reshape(-1)

    def read(j: int, start: int, count: int) -> torch.Tensor:
        return (fb if j < 0 else flat[j])[start : start + count]

    prep = prepare(spec, key, names, read, fb.numel(), acc, chunk).to(base.device)
    co = TaskCoefficients.make(spec, weights, acc, base.device)
    out = torch.empty(fb.numel(), dtype=dtype or srcs[0].dtype, device=base.device)
    for s in range(0, fb.numel(), chunk):
        n = min(chunk, fb.numel() - s)
        mix_chunk(out[s : s + n], [f[s : s + n] for f in flat], fb[s : s + n], spec, prep, co, s)
    return out.reshape(base.shape)
