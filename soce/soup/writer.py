"""The streamed, sharded, atomic Hugging Face checkpoint writer and its model card."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soce.soup import publish
from soce.soup.arith import CHUNK_ELEMS, Coefficients, _acc_dtype, _chunks, mix_into, nonfinite_at
from soce.soup.checks import _dedup, _dtype, _open_all, check_weights, nonfinite_error
from soce.soup.io import (
    AVERAGED,
    DONOR_FILES,
    INDEX_NAME,
    ST_DTYPES,
    TORCH_TO_ST,
    Checkpoint,
    SoupError,
    TensorInfo,
    _Maps,
)


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524288000, 1000 -> 1000 (bytes)."""
    if isinstance(size, int):
        if size <= 0:
            raise SoupError(f"max_shard_size: {size} must be positive")
        return size
    s = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
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
    co: Coefficients | None  # None: a non-floating tensor, copied after checking all candidates agree
    finite: bool = True  # refuse NaN/inf in the result


def _jobs(keys: list[str], ckpts: list[Checkpoint], specs: dict, coeffs: dict, finite: bool) -> Iterator[_Job]:
    for k in keys:
        infos = [c.tensors[k] for c in ckpts]
        src = ST_DTYPES[infos[0].dtype]
        if src not in AVERAGED:
            if infos[0].numel:
                yield _Job(infos, 0, infos[0].numel, src, None)
            continue
        acc = _acc_dtype(*(ST_DTYPES[i.dtype] for i in infos))
        for s, n in _chunks(infos[0].numel, CHUNK_ELEMS):
            yield _Job(infos, s, n, specs[k][0], coeffs[acc], finite)


def _compute(maps: _Maps, job: _Job, slot: _Slot) -> torch.Tensor:
    """The soup of one chunk, in ``slot``'s buffers (valid until the slot is reused)."""
    infos = job.infos
    if job.co is None:  # checked equal across candidates by _check
        return maps.view(infos[0], 0, job.count)
    srcs = [maps.view(i, job.start, job.count) for i in infos]
    out = slot.get("out", job.out_dtype, job.count)
    acc_dt = job.co.ws[0].dtype
    acc = slot.get("acc", acc_dt, job.count)
    mix_into(out, srcs, job.co, acc, slot.get("tmp", acc_dt, job.count))
    bad = nonfinite_at(out, acc, srcs) if job.finite else None
    if bad is not None:
        raise nonfinite_error(infos[0].key, bad, [(i.file, x) for i, x in zip(infos, srcs, strict=True)],
                              job.out_dtype, job.start)
    del srcs
    for i in infos:
        maps.drop(i, job.start, job.count)
    return out


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


def _recipe(ckpts: list[Checkpoint], ws: dict[str, float], donor: str, dtype: torch.dtype | None,
            alias: dict[str, str], recipe: Mapping[str, Any] | None) -> dict:
    from soce import __version__

    total = math.fsum(ws.values())
    rec: dict[str, Any] = {
        "soce_version": __version__,
        "method": "linear",
        "accumulation": "float32 fused multiply-add from 0 in candidate order (float64 for float64 tensors),"
                        " divided by the float32 sum of the weights unless it is 1, rounded to the output dtype",
        "candidates": [
            {"name": c.name, "path": str(c.path), "weight": ws.get(c.name, 0.0) / total,
             "given_weight": ws.get(c.name, 0.0)}
            for c in ckpts
        ],
        "donor": donor,
        "dtype": str(dtype).removeprefix("torch.") if dtype else "as candidates",
    }
    if alias:
        rec["duplicates_merged"] = alias
    if recipe:
        rec.update({str(k): v for k, v in dict(recipe).items()})
    return rec


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
CHOSEN_KEYS = ("benchmark", "split", "objective", "score")  # recipe keys shown as "where it was chosen"


def _base_model(path: str, hub_id: str | None = None) -> str | None:
    """A candidate as the hub's ``base_model``: ``hub_id`` (the recipe's ``hub_ids``: how the pool named it),
    else its config's ``_name_or_path`` when that is a hub id (``org/name``, not a local path), else None (a
    local path is no hub id: it stays in the card's table and the recipe)."""
    try:
        name = hub_id or json.loads((Path(path) / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and _HUB_ID.match(name) and ".." not in name and not Path(name).exists():
        return name
    return None


def _model_card(rec: dict, shards: list[_Shard], copied: list[str]) -> str:
    """README.md: hub front matter (``base_model`` = the ingredients, ``library_name``, ``tags``), the
    ingredients and weights, where the soup was chosen (recipe keys :data:`CHOSEN_KEYS`), the recipe."""
    import yaml

    used = [c for c in rec["candidates"] if c["weight"] > 0]
    hub = [_base_model(c["path"], (rec.get("hub_ids") or {}).get(c["name"])) for c in used]
    front = {**({"base_model": [h for h in hub if h]} if any(hub) else {}), "library_name": "transformers",
             "tags": ["merge", "soce"]}
    rows = "\n".join(f"| {c['name']} | `{c['path']}` | {c['weight']:.6g} |" for c in rec["candidates"])
    chosen = "\n".join(f"- {k}: {rec[k]}" for k in CHOSEN_KEYS if rec.get(k) is not None)
    extra = {k: v for k, v in rec.items() if k not in ("candidates",)}
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# Model soup: {rec.get('strategy', 'linear')}, {len(used)} ingredient(s)\n\n"
        "A linear model soup: every tensor is the weighted average of the candidates' tensors, accumulated "
        f"in float32 and rounded to the output dtype. Written by soce {rec['soce_version']}.\n\n"
        "| candidate | path | weight |\n|---|---|---|\n"
        f"{rows}\n\n"
        "## Where it was chosen\n\n" + (chosen or "Weights given by the caller (no benchmark recorded).") + "\n\n"
        f"Config, generation config and tokenizer copied from donor **{rec['donor']}**: "
        f"{', '.join(copied) or 'none found'}.\n\n"
        f"Weights in {len(shards)} shard(s).\n\n"
        "## Recipe\n\n```json\n" + json.dumps(extra, indent=2, default=str) + "\n```\n"
    )


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
) -> Path:
    """Stream the weighted average of the candidates' safetensors tensors (file keys) to a Hugging Face
    checkpoint dir ``output`` and return its resolved path.

    ``models``: candidate name -> checkpoint dir (or .safetensors file); same resolved path twice is merged
    (weights summed). ``weights``: one finite non-negative weight per candidate, rescaled to sum 1
    (``normalize=False``: rejected unless they sum to 1). ``donor``: candidate whose config, generation
    config and tokenizer files are copied (default: first). ``dtype``: output dtype of floating tensors
    (default: each tensor's own dtype). ``max_shard_size``: bytes or '5GB'/'500MiB'. ``recipe``: extra
    provenance stored in README.md and the safetensors metadata (``split``, ``objective``, ``score``: where
    the soup was chosen, shown in the model card). ``workers``: compute threads (default: CPUs available, at
    most 8); torch runs single-threaded meanwhile. ``allow_nonfinite``: keep NaN/inf (else SoupError naming
    the tensor and file, and nothing is published).

    Inputs, weights and paths are checked before anything is written; ``output`` is resolved (``..``,
    symlinks) and may not be, contain or lie inside an input, with or without ``overwrite``. The soup
    appears at ``output`` whole or not at all (see :mod:`soce.soup.publish`): without ``overwrite`` an
    existing output is never replaced, even one published by a concurrent writer meanwhile; with it the old
    output stays in place until the new one replaces it. Leftovers of killed writers are cleaned first.
    """
    mp, wts_given, alias = _dedup(models, weights)
    names = list(mp)
    ws = check_weights(names, wts_given or {}, normalize=normalize)
    donor = alias.get(donor, donor) if donor is not None else names[0]
    if donor not in mp:
        raise SoupError(f"donor: {donor!r} is not a candidate (candidates: {', '.join(names)})")
    out_dt = _dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    out = publish.output_path(output, mp)
    publish.recover(out.parent)
    if os.path.lexists(out) and not overwrite:
        raise SoupError(f"{out}: output exists (pass overwrite=true to replace it)")
    ckpts = _open_all(mp, mixed_ok=out_dt is not None)
    specs = {k: ((out_dt if out_dt and ST_DTYPES[i.dtype] in AVERAGED else ST_DTYPES[i.dtype]), i.shape)
             for k, i in ckpts[0].tensors.items()}
    rec = _recipe(ckpts, ws, donor, out_dt, alias, recipe)
    if allow_nonfinite:
        rec["allow_nonfinite"] = True
    shards = _plan_shards(specs, shard_bytes, {"format": "pt", "soce_recipe": json.dumps(rec, default=str)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.soce-tmp-{publish.owner_tag()}"
    tmp.mkdir()
    try:
        used = [c for c in ckpts if c.name in ws]
        coeffs = {dt: Coefficients.make([ws[c.name] for c in used], dt, "cpu", normalize)
                  for dt in (torch.float32, torch.float64)}
        _write_shards(tmp, shards, [_jobs(sh.keys, used, specs, coeffs, not allow_nonfinite) for sh in shards],
                      workers or _default_workers())
        _write_extras(tmp, mp[donor], out_dt, rec, shards)
        publish.fsync_tree(tmp)
        publish.publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(tmp: Path, shards: list[_Shard], jobs: list[Iterator[_Job]], workers: int) -> None:
    """Each shard: header, then its tensors' chunks in order; fsynced (the index file when sharded)."""
    maps = _Maps(sequential=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over chunks instead: no OpenMP barriers (costly on busy CPUs)
    try:
        for sh, js in zip(shards, jobs, strict=True):
            with open(tmp / sh.name, "wb", buffering=0) as fh:
                _write_all(fh, sh.header)
                _stream(maps, js, fh, workers)
    finally:
        torch.set_num_threads(threads)
        maps.close()


def _write_extras(tmp: Path, src: Path, out_dt: torch.dtype | None, rec: dict, shards: list[_Shard]) -> None:
    """Index (when sharded), the donor's config/tokenizer files, the model card and the recipe."""
    if len(shards) > 1:
        weight_map = {k: sh.name for sh in shards for k in sh.keys}
        idx = {"metadata": {"total_size": sum(s.size for s in shards), "soce_recipe": rec},
               "weight_map": dict(sorted(weight_map.items()))}
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
    (tmp / "README.md").write_text(_model_card(rec, shards, copied))
    (tmp / "soce_recipe.json").write_text(json.dumps(rec, indent=2, default=str) + "\n")


def _write_all(fh, data) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        mv = mv[fh.write(mv):]
