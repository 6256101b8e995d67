"""Safetensors reading: dtype tables, headers checked strictly, checkpoints found on disk."""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BASE = "<base>"  # the name the base checkpoint of a task-vector merge goes by (never a directory's name)


def who(name: str) -> str:
    """How a message names a checkpoint: ``candidate 'A'``, or ``the base checkpoint``."""
    return "the base checkpoint" if name == BASE else f"candidate {name!r}"


# safetensors dtype codes -> torch dtypes (the ones torch can hold).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
}
AVERAGED = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DONOR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
INDEX_NAME = "model.safetensors.index.json"


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


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header; returns (tensors by key, ``__metadata__``).

    As strict as safetensors itself: no duplicate keys; each tensor's byte length matches its shape and
    dtype; sorted by offset, the tensors tile the data section exactly (the first starts at 0, each starts
    where the previous ends: no overlap, no gap) and the last one ends at the end of the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SoupError(f"{file}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise SoupError(f"{file}: not a safetensors file or truncated (header length {n} > file)")
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except OSError as e:
        raise SoupError(f"{file}: cannot read ({e.strerror or e})") from e
    except _DuplicateKey as e:
        raise SoupError(f"{file}: corrupt safetensors header (key {str(e)!r} appears twice)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SoupError(f"{file}: corrupt safetensors header ({_one_line(e)})") from e
    if not isinstance(header, dict):
        raise SoupError(f"{file}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    out = {key: _tensor_info(file, key, spec, 8 + n, size) for key, spec in header.items()}
    _check_layout(file, list(out.values()), 8 + n, size)
    return out, meta


def _tensor_info(file: Path, key: str, spec: Any, start: int, size: int) -> TensorInfo:
    """One header entry as absolute offsets; its byte length must match its shape and dtype."""
    try:
        dtype, shape, (b, e) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
    except (KeyError, TypeError, ValueError) as err:
        raise SoupError(f"{file}: tensor {key!r}: corrupt header entry") from err
    if not all(type(x) is int for x in (*shape, b, e)):  # JSON integers only, as safetensors requires
        raise SoupError(f"{file}: tensor {key!r}: corrupt header entry (shape and offsets must be integers)")
    if dtype not in ST_DTYPES:
        raise SoupError(f"{file}: tensor {key!r}: unsupported dtype {dtype}")
    info = TensorInfo(key, dtype, shape, file, start + b, start + e)
    if min(shape, default=0) < 0 or b < 0 or e - b != info.numel * ST_DTYPES[dtype].itemsize:
        raise SoupError(f"{file}: tensor {key!r}: data offsets do not match shape {list(shape)} {dtype}")
    if info.end > size:
        raise SoupError(f"{file}: tensor {key!r}: file truncated ({size} bytes, tensor ends at {info.end})")
    return info


def _check_layout(file: Path, infos: list[TensorInfo], start: int, size: int) -> None:
    """Sorted by offset, the tensors tile [start, size) exactly, as safetensors requires."""
    pos, prev = start, None
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.begin < pos:
            raise SoupError(
                f"{file}: tensor {info.key!r}: data overlaps tensor {prev!r}"
                f" (bytes {info.begin - start}..{info.end - start} of the data section)"
            )
        if info.begin > pos:
            where = f"after tensor {prev!r}" if prev else "at the start of the data section"
            raise SoupError(f"{file}: tensor {info.key!r}: {info.begin - pos} unused bytes {where}")
        pos, prev = info.end, info.key
    if pos != size:
        raise SoupError(f"{file}: {size - pos} bytes after the last tensor (not a valid safetensors file)")


def _pickle_hint(path: Path, found: Path) -> SoupError:
    return SoupError(
        f"{path}: only pickle weights ({found.name}) found; pickles can run code and are refused. Convert once"
        f' with: python -c "from transformers import AutoModelForCausalLM as M;'
        f" M.from_pretrained('{path}', dtype='auto').save_pretrained('{path}-safetensors')\""
    )


def open_checkpoint(name: str, path: str | Path) -> Checkpoint:
    """Find a candidate's safetensors files (single, sharded with an index, or a bare ``.safetensors``
    file) and read their headers. Raises SoupError on missing/pickle/corrupt checkpoints."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SoupError(f"{p}: {who(name)} does not exist")
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
                raise SoupError(f"{p}: no *.safetensors weights in {who(name)}")
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
        raise SoupError(f"{files[0]}: {who(name)} has no tensors")
    return ckpt


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
            return torch.frombuffer(self.get(info.file), dtype=dt, count=count, offset=info.begin + start * dt.itemsize)

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
