"""The streamed, sharded, atomic Hugging Face checkpoint writer (every operator of :mod:`soce.soup.operators`)."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import struct
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soce.soup import card, publish
from soce.soup.arith import CHUNK_ELEMS, Coefficients, _acc_dtype, _chunks, mix_into, nonfinite_at
from soce.soup.checks import _dedup, _dtype, _open_all, check_weights, nonfinite_error
from soce.soup.io import (
    AVERAGED,
    BASE,
    DONOR_FILES,
    INDEX_NAME,
    ST_DTYPES,
    TORCH_TO_ST,
    Checkpoint,
    SoupError,
    TensorInfo,
    _Maps,
)
from soce.soup.operators import MergeSpec
from soce.soup.operators.task_vectors import Prepared, TaskCoefficients, mix_chunk, prepare
from soce.soup.prepq import PrepQueue


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524288000, 1000 -> 1000 (bytes)."""
    if isinstance(size, int):
        if size <= 0:
            raise SoupError(f"max_shard_size: {size} must be positive")
        return size
    s = str(size).strip().upper().replace(" ", "")
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    for u, m in units.items():
        if s.endswith(u):
            try:
                v = int(float(s[: -len(u)]) * m)
            except ValueError:
                break
            if v > 0:
                return v
            break
    else:
        if s.isdigit() and int(s) > 0:
            return int(s)
    raise SoupError(f"max_shard_size: cannot parse {size!r} (e.g. 5GB, 500MiB, or bytes)")


@dataclass
class _Shard:
    name: str
    keys: list[str]
    header: bytes
    size: int


def _plan_shards(
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_bytes: int, metadata: dict[str, str]
) -> list[_Shard]:
    """Greedy shards in (itemsize desc, key) order; each header lays its tensors contiguously."""
    keys = sorted(specs, key=lambda k: (-specs[k][0].itemsize, k))
    groups: list[list[str]] = [[]]
    cur = 0
    for k in keys:
        n = math.prod(specs[k][1]) * specs[k][0].itemsize
        if groups[-1] and cur + n > max_bytes:
            groups.append([])
            cur = 0
        groups[-1].append(k)
        cur += n
    shards = []
    total = len(groups)
    for i, g in enumerate(groups):
        name = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        hdr: dict[str, Any] = {"__metadata__": metadata}
        off = 0
        for k in g:
            dt, shape = specs[k]
            n = math.prod(shape) * dt.itemsize
            hdr[k] = {"dtype": TORCH_TO_ST[dt], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(hdr, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        shards.append(_Shard(name, g, struct.pack("<Q", len(raw)) + raw, off))
    return shards


class _Slot:
    """Reusable scratch buffers of one in-flight chunk (grown on demand, never shrunk)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.raw: dict[str, torch.Tensor] = {}
        self.device = device

    def get(self, name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        need = n * dtype.itemsize
        r = self.raw.get(name)
        if r is None or r.numel() < need:
            r = self.raw[name] = torch.empty(max(need, CHUNK_ELEMS * 4), dtype=torch.uint8, device=self.device)
        return r[:need].view(dtype)


@dataclass(frozen=True)
class _Job:
    """Elements [start, start+count) of one output tensor."""

    infos: list[TensorInfo]
    start: int
    count: int
    out_dtype: torch.dtype
    co: Coefficients | None  # linear weights; None with no task: a non-floating tensor, copied (checked equal)
    finite: bool = True  # refuse NaN/inf in the result
    task: _TaskTensor | None = None  # a task-vector operator's tensor


@dataclass
class _TaskTensor:
    """One tensor of a task-vector soup: its base, the operator, the weights, and the futures of its
    per-candidate preparation (:func:`soce.soup.operators.task_vectors.prepare`, run on the prep pool)."""

    base: TensorInfo
    spec: MergeSpec
    co: TaskCoefficients
    futures: list[Future]
    _prep: Prepared | None = None

    def prepared(self) -> Prepared:
        """The whole tensor's :class:`Prepared` (waits for its candidates' preparations)."""
        if self._prep is None and not self.futures:  # nothing to prepare (task arithmetic, density 1)
            n = len(self.co.ws)
            self._prep = Prepared([None] * n, [None] * n, [None] * n)
        elif self._prep is None:
            parts = [f.result() for f in self.futures]
            self._prep = Prepared(
                [p.masks[0] for p in parts], [p.salts[0] for p in parts], [p.scales[0] for p in parts]
            )
        return self._prep


@dataclass
class _Soup:
    """A soup checked and planned, before anything is written: output, candidates that take part (weight
    > 0), their weights, base (task-vector operators), operator, output tensors and shards, recipe."""

    out: Path
    used: list[Checkpoint]
    ws: dict[str, float]
    base: Checkpoint | None
    spec: MergeSpec
    normalize: bool
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    shards: list[_Shard]
    rec: dict
    donor: Path
    out_dt: torch.dtype | None
    finite: bool
    overwrite: bool


def _jobs(
    soup: _Soup, keys: list[str], maps: _Maps, preps: dict[str, list[Future]] | None, queue: PrepQueue | None
) -> Iterator[_Job]:
    """The chunks of ``keys`` in order; a task-vector soup's chunks carry their tensor's prep futures
    (``preps``, submitted to ``queue``, which learns how far the writer got)."""
    ws = [soup.ws[c.name] for c in soup.used]
    acc_of = {k: _acc_dtype(*(ST_DTYPES[c.tensors[k].dtype] for c in soup.used)) for k in keys}
    if soup.base is None:
        coeffs = {dt: Coefficients.make(ws, dt, "cpu", soup.normalize) for dt in (torch.float32, torch.float64)}
    else:
        acc_of = {k: _acc_dtype(a, ST_DTYPES[soup.base.tensors[k].dtype]) for k, a in acc_of.items()}
        tco = {dt: TaskCoefficients.make(soup.spec, ws, dt) for dt in (torch.float32, torch.float64)}
    for k in keys:
        infos = [c.tensors[k] for c in soup.used]
        if ST_DTYPES[infos[0].dtype] not in AVERAGED:
            if infos[0].numel:
                yield _Job(infos, 0, infos[0].numel, ST_DTYPES[infos[0].dtype], None)
            continue
        task = None
        if soup.base is not None:
            futs = preps.pop(k, None) if preps is not None else None
            task = _TaskTensor(soup.base.tensors[k], soup.spec, tco[acc_of[k]], futs or [])
            if queue is not None and futs:
                queue.reach(futs[0].soce_pos)
        for s, n in _chunks(infos[0].numel, CHUNK_ELEMS):
            yield _Job(infos, s, n, soup.specs[k][0], None if task else coeffs[acc_of[k]], soup.finite, task)


def _submit_preps(soup: _Soup, maps: _Maps, queue: PrepQueue) -> dict[str, list[Future]]:
    """Every floating tensor's preparation, one future per candidate, in write order."""
    out: dict[str, list[Future]] = {}
    pos = 0
    for k in [k for sh in soup.shards for k in sh.keys]:
        numel = soup.base.tensors[k].numel
        if ST_DTYPES[soup.base.tensors[k].dtype] in AVERAGED and numel:
            acc = _acc_dtype(ST_DTYPES[soup.base.tensors[k].dtype], *(ST_DTYPES[c.tensors[k].dtype] for c in soup.used))
            cost = _prep_cost(soup.spec, numel)
            out[k] = [queue.submit(functools.partial(_prep_one, soup, k, c, acc, maps), cost, pos) for c in soup.used]
            for f in out[k]:
                f.soce_pos = pos
        pos += numel
    return out


def _prep_one(soup: _Soup, key: str, c: Checkpoint, acc: torch.dtype, maps: _Maps) -> Prepared:
    """Candidate ``c``'s :class:`Prepared` (one entry) for tensor ``key``; pages released as it reads."""
    info, base = c.tensors[key], soup.base.tensors[key]

    def read(j: int, start: int, count: int) -> torch.Tensor:
        return maps.view(info if j >= 0 else base, start, count)

    def release(j: int, start: int, count: int) -> None:
        maps.drop(info, start, count)
        maps.drop(base, start, count)

    return prepare(soup.spec, key, [c.name], read, info.numel, acc, release=release)


def _compute(maps: _Maps, job: _Job, slot: _Slot) -> torch.Tensor:
    """The soup of one chunk, in ``slot``'s buffers (valid until the slot is reused)."""
    infos = job.infos
    if job.co is None and job.task is None:  # checked equal across candidates by _check
        return maps.view(infos[0], 0, job.count)
    srcs = [maps.view(i, job.start, job.count) for i in infos]
    out = slot.get("out", job.out_dtype, job.count)
    if job.task is not None:
        t = job.task
        base = maps.view(t.base, job.start, job.count)
        mix_chunk(out, srcs, base, t.spec, t.prepared(), t.co, job.start, slot.get)
        bad = _first_nonfinite(out) if job.finite else None
        srcs.append(base)
        infos = [*infos, t.base]
    else:
        acc_dt = job.co.ws[0].dtype
        acc = slot.get("acc", acc_dt, job.count)
        mix_into(out, srcs, job.co, acc, slot.get("tmp", acc_dt, job.count))
        bad = nonfinite_at(out, acc, srcs) if job.finite else None
    if bad is not None:
        raise nonfinite_error(
            infos[0].key, bad, [(i.file, x) for i, x in zip(infos, srcs, strict=True)], job.out_dtype, job.start
        )
    del srcs
    for i in infos:
        maps.drop(i, job.start, job.count)
    return out


def _first_nonfinite(out: torch.Tensor) -> int | None:
    """Index of the first NaN/inf of ``out`` (1-D), or None; one float32 sum when all are finite."""
    if bool(torch.isfinite(out.sum(dtype=torch.float32 if out.dtype.itemsize == 2 else None))):
        return None
    bad = (~torch.isfinite(out)).nonzero()
    return int(bad[0]) if len(bad) else None


def _stream(maps: _Maps, jobs: Iterator[_Job], fh, workers: int) -> None:
    """Compute jobs on ``workers`` threads (torch ops release the GIL) and write results in order."""
    if workers <= 1:
        slot = _Slot()
        for job in jobs:
            _write_all(fh, _compute(maps, job, slot).view(torch.uint8).numpy())
        return
    depth = 2 * workers
    free = [_Slot() for _ in range(depth)]
    pending: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="soce-soup") as pool:
        try:
            for job in jobs:
                if len(pending) == depth:
                    fut, slot = pending.popleft()
                    _write_all(fh, fut.result().view(torch.uint8).numpy())
                    free.append(slot)
                slot = free.pop()
                pending.append((pool.submit(_compute, maps, job, slot), slot))
            while pending:
                fut, _ = pending.popleft()
                _write_all(fh, fut.result().view(torch.uint8).numpy())
        finally:
            for fut, _ in pending:
                fut.cancel()


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def write_soup(
    models: Mapping[str, str | Path],
    weights: Mapping[str, float],
    output: str | Path,
    *,
    donor: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    normalize: bool = True,
    recipe: Mapping[str, Any] | None = None,
    workers: int | None = None,
    allow_nonfinite: bool = False,
    merge: MergeSpec | Mapping[str, Any] | None = None,
    base: str | Path | None = None,
) -> Path:
    """Stream the soup of the candidates' safetensors tensors (file keys) to a Hugging Face checkpoint dir
    ``output`` and return its resolved path.

    ``models``: candidate name -> checkpoint dir (or .safetensors file); same resolved path twice is merged
    (weights summed). ``weights``: one finite non-negative weight per candidate (0: does not take part).
    ``merge``: the operator and its parameters (:class:`soce.soup.operators.MergeSpec` or a mapping with
    ``method``, ``density``, ``lambda``, ``normalize``, ``rescale``, ``seed``; default linear). Linear: the
    weights are rescaled to sum 1 (``normalize=False``: rejected unless they sum to 1). Task-vector
    operators (``task_arithmetic``, ``ties``, ``dare_*``) need ``base``, the checkpoint the candidates were
    fine-tuned from (checked like a candidate: names, shapes, dtypes, NaN); linear ignores it. ``donor``:
    candidate whose config, generation config and tokenizer files are copied (default: first). ``dtype``:
    output dtype of floating tensors (default: each tensor's own dtype). ``max_shard_size``: bytes or
    '5GB'/'500MiB'. ``recipe``: extra provenance stored in README.md and the safetensors metadata
    (``split``, ``objective``, ``score``: where the soup was chosen, shown in the model card). ``workers``:
    compute threads (default: CPUs available, at most 8; task-vector soups use as many again to prepare
    tensors); torch runs single-threaded meanwhile. ``allow_nonfinite``: keep NaN/inf (else SoupError
    naming the tensor and file, and nothing is published).

    Inputs, weights and paths are checked before anything is written; ``output`` is resolved (``..``,
    symlinks) and may not be, contain or lie inside an input (base included), with or without
    ``overwrite``. The soup appears at ``output`` whole or not at all (see :mod:`soce.soup.publish`):
    without ``overwrite`` an existing output is never replaced, even one published by a concurrent writer
    meanwhile; with it the old output stays in place until the new one replaces it. Leftovers of killed
    writers are cleaned first. Memory: a few chunk buffers; TIES also one whole tensor's magnitude keys and
    its mask per prep thread (~9 bytes per element of the largest tensor).
    """
    soup = _plan_soup(
        models,
        weights,
        output,
        donor=donor,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        normalize=normalize,
        recipe=recipe,
        allow_nonfinite=allow_nonfinite,
        merge=merge,
        base=base,
    )
    return _publish_soup(soup, workers or _default_workers())


def _merge_spec(merge: MergeSpec | Mapping[str, Any] | None) -> MergeSpec:
    try:
        spec = merge if isinstance(merge, MergeSpec) else MergeSpec.from_mapping(merge or {})
    except (TypeError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise SoupError(msg if msg.startswith("merge") else f"merge: {msg}") from None
    problem = spec.problem()
    if problem:
        raise SoupError(problem)
    return spec


def _base_path(spec: MergeSpec, base: str | Path | None) -> tuple[str, Path] | None:
    """(name, resolved path) of the base for a task-vector operator; None for linear."""
    if not spec.needs_base:
        return None
    if base is None or not str(base).strip():
        raise SoupError(
            f"merge method {spec.method!r} needs a base checkpoint (base=..., pool.base): the task"
            " vectors are the candidates minus the model they were fine-tuned from"
        )
    return BASE, Path(base).expanduser().resolve()


def _plan_soup(
    models, weights, output, *, donor, dtype, max_shard_size, overwrite, normalize, recipe, allow_nonfinite, merge, base
) -> _Soup:
    """Every check, in the order of the arguments; nothing is written (stale temporaries are cleaned)."""
    spec = _merge_spec(merge)
    mp, wts_given, alias = _dedup(models, weights)
    names = list(mp)
    linear = spec.method == "linear"
    norm = (normalize if spec.normalize is None else spec.do_normalize) if linear else spec.do_normalize
    ws = check_weights(names, wts_given or {}, normalize=norm or not linear, signed=spec.needs_base)
    donor = alias.get(donor, donor) if donor is not None else names[0]
    if donor not in mp:
        raise SoupError(f"donor: {donor!r} is not a candidate (candidates: {', '.join(names)})")
    out_dt = _dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    bp = _base_path(spec, base)
    inputs = {**mp, **dict([bp] if bp else [])}
    out = publish.output_path(output, inputs)
    publish.recover(out.parent)
    if os.path.lexists(out):
        _check_replaceable(out, overwrite)
    ckpts = _open_all(inputs, mixed_ok=out_dt is not None)
    base_ck = ckpts.pop() if bp else None
    specs = {
        k: ((out_dt if out_dt and ST_DTYPES[i.dtype] in AVERAGED else ST_DTYPES[i.dtype]), i.shape)
        for k, i in ckpts[0].tensors.items()
    }
    rec = card.recipe(ckpts, ws, donor, out_dt, alias, recipe, spec, base_ck)
    if allow_nonfinite:
        rec["allow_nonfinite"] = True
    shards = _plan_shards(specs, shard_bytes, {"format": "pt", "soce_recipe": json.dumps(rec, default=str)})
    return _Soup(
        out,
        [c for c in ckpts if c.name in ws],
        ws,
        base_ck,
        spec,
        norm,
        specs,
        shards,
        rec,
        mp[donor],
        out_dt,
        not allow_nonfinite,
        overwrite,
    )


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """An existing output is replaced only with ``overwrite``, and only if it is a soup soce wrote (a directory
    holding :data:`card.RECIPE_FILE`) or an empty directory: never a user's other files (``output=~`` is a typo)."""
    if not overwrite:
        raise SoupError(f"{out}: output exists (pass overwrite=true to replace it)")
    if out.is_dir() and ((out / card.RECIPE_FILE).is_file() or not any(out.iterdir())):
        return
    raise SoupError(
        f"{out}: exists and is not a soup soce wrote (no {card.RECIPE_FILE}); overwrite=true replaces only those:"
        " remove it or choose another output"
    )


def _publish_soup(soup: _Soup, workers: int) -> Path:
    """Write the planned soup into a hidden sibling of its output, fsync it, publish it (atomically)."""
    out = soup.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.soce-tmp-{publish.owner_tag()}"
    tmp.mkdir()
    try:
        _write_shards(tmp, soup, workers)
        _write_extras(tmp, soup.donor, soup.out_dt, soup.rec, soup.shards)
        publish.fsync_tree(tmp)
        publish.publish(tmp, out, soup.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(tmp: Path, soup: _Soup, workers: int) -> None:
    """Each shard: header, then its tensors' chunks in order; fsynced (the index file when sharded)."""
    maps = _Maps(sequential=True)
    for c in [*soup.used, *([soup.base] if soup.base else [])]:
        for f in c.files:
            maps.get(f)  # opened here, once: prep threads share the maps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over chunks instead: no OpenMP barriers (costly on busy CPUs)
    queue = _prep_queue(soup, workers)
    try:
        preps = _submit_preps(soup, maps, queue) if queue is not None else None
        for sh in soup.shards:
            with open(tmp / sh.name, "wb", buffering=0) as fh:
                _write_all(fh, sh.header)
                _stream(maps, _jobs(soup, sh.keys, maps, preps, queue), fh, workers)
    finally:
        if queue is not None:
            queue.close()
        torch.set_num_threads(threads)
        maps.close()


BUDGET_TASKS = 1.25  # the prep pool's memory budget in units of its largest task: one embedding trim at a time
TRIM_BYTES = 12  # TIES' trim of one tensor: 8-byte keys + 1-byte mask + chunk temporaries, per element
DARE_BYTES = 40  # DARE's L1 rescale: per element of a chunk (at most 2^22 elements)


def _prep_cost(spec: MergeSpec, numel: int) -> int:
    """Bytes that preparing one candidate's tensor of ``numel`` elements holds while it runs."""
    return numel * TRIM_BYTES if spec.op.sparsify == "magnitude" else min(numel, 1 << 22) * DARE_BYTES


def _prep_queue(soup: _Soup, workers: int) -> PrepQueue | None:
    """A :class:`PrepQueue` when the operator prepares tensors: ``workers`` threads; budget BUDGET_TASKS times the
    largest task (one embedding's trim at a time, smaller ones beside it); look-ahead of 4 times the
    largest tensor or 256M elements."""
    spec = soup.spec
    if soup.base is None or spec.op.sparsify is None or spec.density >= 1:
        return None
    big = max(i.numel for i in soup.base.tensors.values())
    return PrepQueue(workers, int(_prep_cost(spec, big) * BUDGET_TASKS), max(4 * big, 1 << 28))


def _write_extras(tmp: Path, src: Path, out_dt: torch.dtype | None, rec: dict, shards: list[_Shard]) -> None:
    """Index (when sharded), the donor's config/tokenizer files, the model card and the recipe."""
    if len(shards) > 1:
        weight_map = {k: sh.name for sh in shards for k in sh.keys}
        idx = {
            "metadata": {"total_size": sum(s.size for s in shards), "soce_recipe": rec},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / INDEX_NAME).write_text(json.dumps(idx, indent=2, default=str) + "\n")
    copied = []
    for fname in DONOR_FILES:
        if (src / fname).is_file():
            shutil.copyfile(src / fname, tmp / fname)
            copied.append(fname)
    if out_dt is not None and (tmp / "config.json").is_file():
        cfg = json.loads((tmp / "config.json").read_text())
        name = str(out_dt).removeprefix("torch.")
        for k in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            cfg[k] = name
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    rec["donor_files"] = copied
    if (src / "config.json").is_file() and "auto_map" in (src / "config.json").read_text():
        rec["note"] = "config.json has auto_map (custom code): its .py files are not copied; soce never runs them"
    (tmp / "README.md").write_text(card.model_card(rec, len(shards), copied))
    (tmp / card.RECIPE_FILE).write_text(json.dumps(rec, indent=2, default=str) + "\n")


def _write_all(fh, data) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        mv = mv[fh.write(mv) :]
