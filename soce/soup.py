"""Linear soups of fine-tuned checkpoints: streamed to disk, or re-mixed in memory.

A soup of candidates M_1..M_n with weights w_1..w_n is, for every tensor key of the candidates'
safetensors files, ``sum_j w_j * T_j / sum_j w_j``. Bit for bit: a float32 accumulator (float64 if an input
is float64) starts at +0 and takes ``acc = fma(w_j, T_j, acc)`` (one rounding per term, torch ``addcmul_``)
in the order of the ``models`` mapping, with the weights as float32; it is divided by their float32 sum
unless that is exactly 1; then rounded once to the output dtype. This is :func:`reference_soup`, and
exactly what mergekit 0.1.5's linear merge computes (CPU and ``--cuda``). The unfused
``sum(w * t.float())`` rounds twice per term and differs in ~1% of bf16 elements by one unit in the last
place. Candidates whose weight is 0 do not take part.

Two paths compute it with the same elementwise operations (so their results are identical):

* :func:`write_soup` streams chunk by chunk from memory-mapped safetensors files into a sharded Hugging Face
  checkpoint directory, written atomically (temporary sibling directory, renamed at the end). Peak memory
  is a few chunk buffers, independent of model size.
* :class:`Remixer` keeps the experts resident (GPU when there is one and they fit, else CPU) and writes each
  new soup into the parameters of one live ``transformers`` model in place.

Every input problem raises :class:`SoupError` whose message is one line naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import uuid
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soce import gpu_mix

__all__ = ["SoupError", "check_models", "write_soup", "Remixer", "parse_size", "reference_soup", "mix_into"]

# safetensors dtype codes -> torch dtypes (the ones torch can hold).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
    "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64,
}
AVERAGED = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DONOR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)
INDEX_NAME = "model.safetensors.index.json"
CHUNK_ELEMS = 1 << 18  # elements per arithmetic chunk on CPU: 1 MiB of float32 accumulator, stays in L2
GPU_CHUNK_ELEMS = 1 << 26  # on GPU without the fused kernel (soce/gpu_mix.py): fewer, larger torch kernels


class SoupError(ValueError):
    """Bad input for a soup; ``str(e)`` is one line naming the file/tensor and the problem."""


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``file`` bytes [begin, end) (absolute offsets), dtype code, shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checkpoint:
    """One candidate: its directory, safetensors files and tensors by key (file keys, not model names)."""

    name: str
    path: Path
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header; returns (tensors by key, ``__metadata__``)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SoupError(f"{file}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise SoupError(f"{file}: not a safetensors file or truncated (header length {n} > file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise SoupError(f"{file}: cannot read ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SoupError(f"{file}: corrupt safetensors header ({_one_line(e)})") from e
    if not isinstance(header, dict):
        raise SoupError(f"{file}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    out: dict[str, TensorInfo] = {}
    for key, spec in header.items():
        try:
            dtype, shape, (b, e) = spec["dtype"], tuple(int(s) for s in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise SoupError(f"{file}: tensor {key!r}: corrupt header entry") from err
        if dtype not in ST_DTYPES:
            raise SoupError(f"{file}: tensor {key!r}: unsupported dtype {dtype}")
        info = TensorInfo(key, dtype, shape, file, start + int(b), start + int(e))
        expect = info.numel * ST_DTYPES[dtype].itemsize
        if info.end - info.begin != expect or info.begin < start:
            raise SoupError(f"{file}: tensor {key!r}: data offsets do not match shape {list(shape)} {dtype}")
        if info.end > size:
            raise SoupError(f"{file}: tensor {key!r}: file truncated ({size} bytes, tensor ends at {info.end})")
        out[key] = info
    return out, meta


def _pickle_hint(path: Path, found: Path) -> SoupError:
    return SoupError(
        f"{path}: only pickle weights ({found.name}) found; pickles can run code and are refused. Convert once"
        f" with: python -c \"from transformers import AutoModelForCausalLM as M;"
        f" M.from_pretrained('{path}', dtype='auto').save_pretrained('{path}-safetensors')\""
    )


def open_checkpoint(name: str, path: str | Path) -> Checkpoint:
    """Find a candidate's safetensors files (single, sharded with an index, or a bare ``.safetensors``
    file) and read their headers. Raises SoupError on missing/pickle/corrupt checkpoints."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SoupError(f"{p}: candidate {name!r} does not exist")
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise _pickle_hint(p.parent, p)
        files = [p]
        directory = p.parent
    else:
        directory = p
        index = p / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = [p / f for f in dict.fromkeys(weight_map.values())]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise SoupError(f"{index}: corrupt index ({_one_line(e)})") from e
            for f in files:
                if not f.is_file():
                    raise SoupError(f"{f}: shard listed in {index.name} is missing")
        else:
            weight_map = None
            files = sorted(p.glob("*.safetensors"))
            if not files:
                pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
                if pickles:
                    raise _pickle_hint(p, pickles[0])
                raise SoupError(f"{p}: no *.safetensors weights in candidate {name!r}")
    ckpt = Checkpoint(name, directory, files)
    for f in files:
        tensors, _ = read_header(f)
        for key, info in tensors.items():
            if key in ckpt.tensors:
                raise SoupError(f"{f}: tensor {key!r} also in {ckpt.tensors[key].file.name}")
            ckpt.tensors[key] = info
    if p.is_dir() and weight_map is not None:
        for key, fname in weight_map.items():
            got = ckpt.tensors.get(key)
            if got is None or got.file.name != Path(fname).name:
                raise SoupError(f"{p / fname}: tensor {key!r} listed in {INDEX_NAME} but not in that shard")
    if not ckpt.tensors:
        raise SoupError(f"{files[0]}: candidate {name!r} has no tensors")
    return ckpt


# ------------------------------------------------------------------------------------------ validation


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise SoupError(f"dtype {name!r}: unknown (use one of bfloat16, float16, float32, float64)")
    return DTYPE_NAMES[key]


def check_weights(
    names: list[str], weights: Mapping[str, float], *, normalize: bool = True, subset: bool = False
) -> dict[str, float]:
    """Check weights (numbers, finite, >= 0, not all 0, one per candidate unless ``subset``) and return them
    as given, in ``names`` order, zeros dropped. ``normalize=False`` rejects a sum off 1 by more than 1e-6."""
    unknown = [k for k in weights if k not in names]
    if unknown:
        raise SoupError(f"weights: {unknown[0]!r} is not a candidate (candidates: {', '.join(names)})")
    if not subset:
        missing = [n for n in names if n not in weights]
        if missing:
            raise SoupError(f"weights: no weight for candidate {missing[0]!r} (one weight per candidate)")
    out: dict[str, float] = {}
    for n in names:
        if n not in weights:
            continue
        try:
            w = float(weights[n])
        except (TypeError, ValueError) as e:
            raise SoupError(f"weights: {n!r} = {weights[n]!r} is not a number") from e
        if not math.isfinite(w):
            raise SoupError(f"weights: {n!r} = {w} is not finite")
        if w < 0:
            raise SoupError(f"weights: {n!r} = {w} is negative (a soup takes non-negative weights)")
        out[n] = w
    total = math.fsum(out.values())
    if total <= 0:
        raise SoupError("weights: all weights are zero")
    if not normalize and abs(total - 1.0) > 1e-6:
        raise SoupError(f"weights: sum {total!r} != 1 and normalize=false")
    return {n: w for n, w in out.items() if w > 0}


def _dedup(models: Mapping[str, str | Path], weights: Mapping[str, float] | None = None):
    """Merge candidates that resolve to the same path: keep the first name, sum the weights.
    Returns (models, weights, {dropped name: kept name})."""
    if not models:
        raise SoupError("models: no candidates given")
    seen: dict[Path, str] = {}
    out: dict[str, Path] = {}
    alias: dict[str, str] = {}
    for name, p in models.items():
        rp = Path(p).expanduser().resolve()
        if rp in seen:
            alias[str(name)] = seen[rp]
        else:
            seen[rp] = str(name)
            out[str(name)] = rp
    if weights is None:
        return out, None, alias
    merged: dict[str, Any] = {}
    for name, w in weights.items():
        tgt = alias.get(str(name), str(name))
        if tgt in merged:
            try:
                merged[tgt] = float(merged[tgt]) + float(w)
            except (TypeError, ValueError) as e:
                raise SoupError(f"weights: {name!r} = {w!r} is not a number") from e
        else:
            merged[tgt] = w
    return out, merged, alias


def _check(ckpts: list[Checkpoint], mixed_ok: bool = False) -> None:
    """Identical tensor names, shapes and dtypes across candidates (floating dtypes may differ when
    ``mixed_ok``: an output dtype was given); non-floating tensors identical; one line per failure."""
    ref = ckpts[0]
    for c in ckpts[1:]:
        for key, info in ref.tensors.items():
            other = c.tensors.get(key)
            if other is None:
                raise SoupError(
                    f"{c.path}: tensor {key!r} missing in candidate {c.name!r} (present in {info.file})"
                )
            if other.shape != info.shape:
                what = " (vocabulary rows differ)" if other.shape[1:] == info.shape[1:] else ""
                raise SoupError(
                    f"{other.file}: tensor {key!r} shape {list(other.shape)} != {list(info.shape)}"
                    f" in {info.file}{what}"
                )
            floating = ST_DTYPES[other.dtype] in AVERAGED and ST_DTYPES[info.dtype] in AVERAGED
            if other.dtype != info.dtype and not (mixed_ok and floating):
                hint = "pass an output dtype (dtype=bfloat16, ...) to mix them" if floating else "cannot be mixed"
                raise SoupError(
                    f"{other.file}: tensor {key!r} dtype {other.dtype} != {info.dtype} in {info.file} ({hint})"
                )
        extra = [k for k in c.tensors if k not in ref.tensors]
        if extra:
            raise SoupError(
                f"{c.tensors[extra[0]].file}: tensor {extra[0]!r} only in candidate {c.name!r}"
                f" (missing in {ref.path})"
            )
    fixed = [k for k, i in ref.tensors.items() if ST_DTYPES[i.dtype] not in AVERAGED and i.numel]
    if fixed and len(ckpts) > 1:
        maps = _Maps()
        try:
            for k in fixed:
                first = maps.view(ref.tensors[k], 0, ref.tensors[k].numel)
                for c in ckpts[1:]:
                    if not torch.equal(first, maps.view(c.tensors[k], 0, ref.tensors[k].numel)):
                        raise SoupError(f"{c.tensors[k].file}: tensor {k!r} ({ref.tensors[k].dtype}) differs from"
                                        f" {ref.tensors[k].file} and cannot be averaged")
            del first
        finally:
            maps.close()
    cfgs = {}
    for c in ckpts:
        cfg = c.path / "config.json"
        if cfg.is_file():
            try:
                cfgs[c.name] = json.loads(cfg.read_text()).get("model_type")
            except (OSError, ValueError, AttributeError) as e:
                raise SoupError(f"{cfg}: unreadable config ({_one_line(e)})") from e
    if len(set(cfgs.values())) > 1:
        raise SoupError(f"config.json: model_type differs across candidates ({cfgs})")


def _open_all(models: Mapping[str, Path], mixed_ok: bool = False) -> list[Checkpoint]:
    ckpts = [open_checkpoint(n, p) for n, p in models.items()]
    _check(ckpts, mixed_ok)
    return ckpts


def check_models(models: Mapping[str, str | Path]) -> dict:
    """Validate candidates (headers only, no tensor data read). Returns a summary:
    ``{"candidates": {name: path}, "duplicates": {name: kept}, "tensors": n, "parameters": n,
    "bytes": n, "dtypes": {dtype: n tensors}, "shapes": {key: shape}}``. Raises SoupError."""
    mp, _, alias = _dedup(models)
    ckpts = _open_all(mp)
    ref = ckpts[0].tensors
    dtypes: dict[str, int] = {}
    for info in ref.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    return {
        "candidates": {c.name: str(c.path) for c in ckpts},
        "duplicates": alias,
        "tensors": len(ref),
        "parameters": sum(i.numel for i in ref.values()),
        "bytes": sum(i.end - i.begin for i in ref.values()),
        "dtypes": dtypes,
        "shapes": {k: list(i.shape) for k, i in ref.items()},
    }


# ------------------------------------------------------------------------------------------ arithmetic


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
    def make(weights: list[float], acc: torch.dtype, device: torch.device | str = "cpu",
             normalize: bool = True) -> Coefficients:
        w = torch.tensor(weights, dtype=acc)
        den = w.sum()
        keep = normalize and bool(den != 1)
        return Coefficients([w[j:j + 1].to(device) for j in range(len(weights))],
                            den.reshape(1).to(device) if keep else None, torch.zeros(1, dtype=acc, device=device))


def mix_into(out: torch.Tensor, srcs: list[torch.Tensor], co: Coefficients, acc: torch.Tensor,
             tmp: torch.Tensor | None = None) -> None:
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


def reference_soup(tensors: list[torch.Tensor], weights: list[float], dtype: torch.dtype | None = None,
                   normalize: bool = True) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------- writing


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


class _Maps:
    """Memory maps of the candidates' files, opened once; pages are dropped after use to keep RSS low."""

    def __init__(self, sequential: bool = False) -> None:
        self.maps: dict[Path, mmap.mmap] = {}
        self.sequential = sequential  # read once front to back: ask the kernel for aggressive read-ahead

    def get(self, file: Path) -> mmap.mmap:
        m = self.maps.get(file)
        if m is None:
            with open(file, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if self.sequential and hasattr(mmap, "MADV_SEQUENTIAL"):
                m.madvise(mmap.MADV_SEQUENTIAL)
            self.maps[file] = m
        return m

    def view(self, info: TensorInfo, start: int, count: int) -> torch.Tensor:
        """Zero-copy 1-D view of elements [start, start+count) of a tensor."""
        dt = ST_DTYPES[info.dtype]
        with warnings.catch_warnings():  # read-only map: torch warns that the tensor is not writable
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self.get(info.file), dtype=dt, count=count,
                                    offset=info.begin + start * dt.itemsize)

    def drop(self, info: TensorInfo, start: int = 0, count: int | None = None) -> None:
        """Release the pages of elements [start, start+count) from this process (they stay in the page
        cache), so that resident memory does not grow with the model."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        m = self.maps[info.file]
        size = ST_DTYPES[info.dtype].itemsize
        b = info.begin + start * size
        e = info.end if count is None else b + count * size
        b -= b % mmap.PAGESIZE
        e = min(len(m), e + (-e % mmap.PAGESIZE))
        if e > b:
            m.madvise(mmap.MADV_DONTNEED, b, e - b)

    def close(self) -> None:
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere; the GC closes it later
                pass
        self.maps.clear()


def _write_all(fh, data) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        mv = mv[fh.write(mv):]


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


def _jobs(keys: list[str], ckpts: list[Checkpoint], specs: dict, coeffs: dict) -> Iterator[_Job]:
    for k in keys:
        infos = [c.tensors[k] for c in ckpts]
        src = ST_DTYPES[infos[0].dtype]
        if src not in AVERAGED:
            if infos[0].numel:
                yield _Job(infos, 0, infos[0].numel, src, None)
            continue
        acc = _acc_dtype(*(ST_DTYPES[i.dtype] for i in infos))
        for s, n in _chunks(infos[0].numel, CHUNK_ELEMS):
            yield _Job(infos, s, n, specs[k][0], coeffs[acc])


def _compute(maps: _Maps, job: _Job, slot: _Slot) -> torch.Tensor:
    """The soup of one chunk, in ``slot``'s buffers (valid until the slot is reused)."""
    infos = job.infos
    if job.co is None:  # checked equal across candidates by _check
        return maps.view(infos[0], 0, job.count)
    srcs = [maps.view(i, job.start, job.count) for i in infos]
    out = slot.get("out", job.out_dtype, job.count)
    acc_dt = job.co.ws[0].dtype
    mix_into(out, srcs, job.co, slot.get("acc", acc_dt, job.count), slot.get("tmp", acc_dt, job.count))
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


def _model_card(rec: dict, shards: list[_Shard], copied: list[str]) -> str:
    rows = "\n".join(
        f"| {c['name']} | `{c['path']}` | {c['weight']:.6g} |" for c in rec["candidates"]
    )
    extra = {k: v for k, v in rec.items() if k not in ("candidates",)}
    return (
        "---\ntags:\n- soce\n- model-soup\n- merge\n---\n\n"
        f"# Model soup ({rec.get('strategy', 'linear')})\n\n"
        "A linear model soup: every tensor is the weighted average of the candidates' tensors, accumulated "
        f"in float32 and rounded to the output dtype. Written by soce {rec['soce_version']}.\n\n"
        "| candidate | path | weight |\n|---|---|---|\n"
        f"{rows}\n\n"
        f"Config, generation config and tokenizer copied from donor **{rec['donor']}**: "
        f"{', '.join(copied) or 'none found'}.\n\n"
        f"Weights in {len(shards)} shard(s).\n\n"
        "## Recipe\n\n```json\n" + json.dumps(extra, indent=2, default=str) + "\n```\n"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(output: Path) -> None:
    """Remove temporary siblings left by merges that were killed (their process is gone)."""
    for d in [*output.parent.glob(f".{output.name}.soce-tmp-*"), *output.parent.glob(f".{output.name}.soce-old-*")]:
        try:
            pid = int(d.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


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
) -> Path:
    """Stream the weighted average of the candidates' safetensors tensors (file keys) to a Hugging Face
    checkpoint dir ``output`` and return its path.

    ``models``: candidate name -> checkpoint dir (or .safetensors file); same resolved path twice is merged
    (weights summed). ``weights``: one finite non-negative weight per candidate, rescaled to sum 1
    (``normalize=False``: rejected unless they sum to 1). ``donor``: candidate whose config, generation
    config and tokenizer files are copied (default: first). ``dtype``: output dtype of floating tensors
    (default: each tensor's own dtype). ``max_shard_size``: bytes or '5GB'/'500MiB'. Everything is checked
    before anything is written; the directory appears atomically (an existing one is replaced only with
    ``overwrite=True``). ``recipe``: extra provenance stored in README.md and the safetensors metadata.
    ``workers``: compute threads (default: CPUs available, at most 8); torch runs single-threaded meanwhile.
    """
    mp, wts_given, alias = _dedup(models, weights)
    names = list(mp)
    ws = check_weights(names, wts_given or {}, normalize=normalize)
    donor = alias.get(donor, donor) if donor is not None else names[0]
    if donor not in mp:
        raise SoupError(f"donor: {donor!r} is not a candidate (candidates: {', '.join(names)})")
    out_dt = _dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    out = Path(output).expanduser().absolute()
    for n, p in mp.items():
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise SoupError(f"{out}: output overlaps candidate {n!r} ({p})")
    if out.exists() and not overwrite:
        raise SoupError(f"{out}: output exists (pass overwrite=true to replace it)")
    ckpts = _open_all(mp, mixed_ok=out_dt is not None)
    ref = ckpts[0].tensors
    specs = {k: ((out_dt if out_dt and ST_DTYPES[i.dtype] in AVERAGED else ST_DTYPES[i.dtype]), i.shape)
             for k, i in ref.items()}
    rec = _recipe(ckpts, ws, donor, out_dt, alias, recipe)
    meta = {"format": "pt", "soce_recipe": json.dumps(rec, default=str)}
    shards = _plan_shards(specs, shard_bytes, meta)

    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.soce-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    maps = _Maps(sequential=True)
    threads = torch.get_num_threads()
    try:
        used = [c for c in ckpts if c.name in ws]
        wl = [ws[c.name] for c in used]
        coeffs = {dt: Coefficients.make(wl, dt, "cpu", normalize) for dt in (torch.float32, torch.float64)}
        weight_map: dict[str, str] = {}
        torch.set_num_threads(1)  # parallel over chunks instead: no OpenMP barriers (costly on busy CPUs)
        for sh in shards:
            with open(tmp / sh.name, "wb", buffering=0) as fh:
                _write_all(fh, sh.header)
                _stream(maps, _jobs(sh.keys, used, specs, coeffs), fh, workers or _default_workers())
            weight_map.update(dict.fromkeys(sh.keys, sh.name))
        torch.set_num_threads(threads)
        if len(shards) > 1:
            total = sum(s.size for s in shards)
            idx = {"metadata": {"total_size": total, "soce_recipe": rec},
                   "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(idx, indent=2, default=str) + "\n")
        copied = []
        src = mp[donor]
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
        maps.close()
        if out.exists():
            trash = out.parent / f".{out.name}.soce-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        torch.set_num_threads(threads)
        maps.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------- remixing


def _device(device: str | None) -> torch.device:
    """The torch device, with an index for CUDA (``cuda`` -> ``cuda:0``), so that it compares equal to a
    tensor's ``.device`` (a bare ``cuda`` does not, which silently took the slow path)."""
    d = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def _chunks(numel: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, numel, size):
        yield s, min(size, numel - s)


class Remixer:
    """Experts kept resident (GPU if available and they fit, else CPU); :meth:`mix` writes a new soup
    into ONE live transformers model's parameters in place, without reloading anything.

    The model is loaded once from the first candidate with ``AutoModelForCausalLM`` (never
    ``trust_remote_code``). The in-memory soup is bit-identical to :func:`write_soup` with the same
    candidates (same order), weights and dtype.
    """

    def __init__(self, models: Mapping[str, str | Path], device: str | None = None, dtype: str | None = None):
        from transformers import AutoModelForCausalLM

        mp, _, self.duplicates = _dedup(models)
        self.names = list(mp)
        out_dt = _dtype(dtype)
        ckpts = _open_all(mp, mixed_ok=out_dt is not None)
        self.ckpts = ckpts
        self.device = _device(device)
        kw: dict[str, Any] = {"dtype": out_dt if out_dt is not None else "auto"}
        self.out_dtype = out_dt
        self.model = AutoModelForCausalLM.from_pretrained(ckpts[0].path, trust_remote_code=False, **kw)
        self.model.to(self.device).eval()
        self.targets = self._map_keys(self.model, ckpts[0])
        self.expert_device = self._expert_device(ckpts)
        self.experts: dict[str, dict[str, torch.Tensor]] = {}
        self._maps = _Maps()
        for c in ckpts:
            self.experts[c.name] = {k: self._load(info) for k, info in c.tensors.items()}
        self._slot = _Slot(self.expert_device)

    @staticmethod
    def _map_keys(model, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
        """File key -> model tensor (parameter or buffer). Tied parameters absent from the file must share
        storage with a mapped one."""
        named = dict(model.named_parameters(remove_duplicate=False))
        named.update(dict(model.named_buffers(remove_duplicate=False)))
        targets: dict[str, torch.Tensor] = {}
        for key, info in ckpt.tensors.items():
            t = named.get(key)
            if t is None:
                raise SoupError(f"{info.file}: tensor {key!r} has no parameter in the loaded"
                                f" {type(model).__name__} (renamed at load time?); use write_soup instead")
            if tuple(t.shape) != info.shape:
                raise SoupError(f"{info.file}: tensor {key!r} shape {list(info.shape)} != model parameter"
                                f" {list(t.shape)}")
            targets[key] = t
        ptrs = {t.data_ptr() for t in targets.values()}
        for name, p in model.named_parameters(remove_duplicate=False):
            if name not in targets and p.data_ptr() not in ptrs:
                raise SoupError(f"{ckpt.path}: model parameter {name!r} is not in the checkpoint files"
                                " and not tied to one that is")
        return targets

    def _expert_device(self, ckpts: list[Checkpoint]) -> torch.device:
        if self.device.type != "cuda":
            return self.device
        need = sum(i.end - i.begin for c in ckpts for i in c.tensors.values())
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need + (2 << 30) < free else torch.device("cpu")

    def _load(self, info: TensorInfo) -> torch.Tensor:
        t = self._maps.view(info, 0, info.numel)
        if self.expert_device.type == "cpu":
            return t  # zero-copy view of the memory-mapped file (shared with the page cache)
        return t.to(self.expert_device)

    @torch.no_grad()
    def mix(self, weights: Mapping[str, float]) -> Any:
        """Write the soup with ``weights`` (subset allowed, missing = 0; normalised to sum 1) into
        ``self.model`` in place and return the model. Asynchronous on CUDA (synchronise to time it)."""
        merged: dict[str, Any] = {}
        for n, w in weights.items():
            tgt = self.duplicates.get(n, n)
            merged[tgt] = (float(merged[tgt]) + float(w)) if tgt in merged else w
        ws = check_weights(self.names, merged, subset=True)
        used = [n for n in self.names if n in ws]
        dev = self.expert_device
        wl = [ws[n] for n in used]
        coeffs = {dt: Coefficients.make(wl, dt, dev) for dt in (torch.float32, torch.float64)}
        chunk = CHUNK_ELEMS if dev.type == "cpu" else GPU_CHUNK_ELEMS
        fused = gpu_mix.available(dev)
        ws32 = torch.cat(coeffs[torch.float32].ws) if fused else None
        for key, target in self.targets.items():
            srcs = [self.experts[n][key] for n in used]
            flat = target.data.view(-1)
            src_dt = srcs[0].dtype
            if src_dt not in AVERAGED:
                flat.copy_(srcs[0])
                continue
            acc_dt = _acc_dtype(*(x.dtype for x in srcs))
            out_dt = self.out_dtype or src_dt  # round as write_soup does, even if the model's dtype differs
            direct = flat.device == dev and flat.dtype == out_dt
            if direct and fused and gpu_mix.fused_mix(flat, srcs, ws32, coeffs[torch.float32].den):
                continue
            for s, n in _chunks(flat.numel(), chunk):
                dst = flat[s:s + n] if direct else self._slot.get("out", out_dt, n)
                tmp = self._slot.get("tmp", acc_dt, n) if dev.type == "cpu" else None
                mix_into(dst, [x[s:s + n] for x in srcs], coeffs[acc_dt], self._slot.get("acc", acc_dt, n), tmp)
                if not direct:
                    flat[s:s + n].copy_(dst)
        return self.model
