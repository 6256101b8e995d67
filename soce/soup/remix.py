"""The in-memory Remixer: experts resident, each new soup written into one live model in place.

The live model is on one device (``device``), or sharded over several (``device_map``, transformers/accelerate
dispatch). Each expert tensor lives beside its live tensor's shard or in (pinned) host memory, streamed per
tensor to the shard's GPU at each re-mix (:mod:`soce.soup.placement`). Every placement gives the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from soce.soup import kernel as gpu_mix
from soce.soup import placement as place
from soce.soup import task_kernel
from soce.soup.arith import CHUNK_ELEMS, GPU_CHUNK_ELEMS, Coefficients, _acc_dtype, _chunks, mix_into
from soce.soup.checks import _dedup, _dtype, _open_all, check_finite, check_weights
from soce.soup.io import AVERAGED, ST_DTYPES, Checkpoint, SoupError, TensorInfo, _Maps
from soce.soup.operators import MergeSpec
from soce.soup.operators.task_vectors import Prepared, TaskCoefficients, mix_chunk, prepare
from soce.soup.placement import HEADROOM_BYTES, HOST, HostArena, as_device, check_device_map, live_tensors
from soce.soup.writer import _base_path, _default_workers, _merge_spec, _Slot

STREAM_CHUNK_ELEMS = 1 << 24  # host experts -> GPU shard: elements per staged copy (32 MiB per bf16 source)
TASK_GPU_CHUNK_ELEMS = 1 << 24  # task-vector operators on GPU: ~(n + 5) float32 temporaries of this size


def _device(device: str | None) -> torch.device:
    """The torch device, with an index for CUDA (``cuda`` -> ``cuda:0``), so that it compares equal to a
    tensor's ``.device`` (a bare ``cuda`` does not, which silently took the slow path)."""
    return as_device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


class _Coeffs:
    """One soup's weights as :class:`Coefficients` on each device that computes, made on first use."""

    def __init__(self, weights: list[float]) -> None:
        self.weights = weights
        self.made: dict[tuple[torch.device, torch.dtype], Coefficients] = {}
        self.fused_args: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None] | None] = {}

    def get(self, dev: torch.device, acc: torch.dtype) -> Coefficients:
        co = self.made.get((dev, acc))
        if co is None:
            co = self.made[(dev, acc)] = Coefficients.make(self.weights, acc, dev)
        return co

    def fused(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(float32 weights, their sum or None) on ``dev`` for the fused kernel; None where it cannot run."""
        if dev not in self.fused_args:
            co = self.get(dev, torch.float32)
            self.fused_args[dev] = (torch.cat(co.ws), co.den) if gpu_mix.available(dev) else None
        return self.fused_args[dev]


class _TaskCoeffs:
    """One task-vector soup's weights (:class:`TaskCoefficients`) per device and working dtype, and the
    positions of the candidates that take part (to pick their :class:`Prepared` entries)."""

    def __init__(self, spec: MergeSpec, used: list[str], ws: Mapping[str, float]) -> None:
        self.spec, self.weights = spec, [ws[n] for n in used]
        self.names = used
        self.made: dict[tuple[torch.device, torch.dtype], TaskCoefficients] = {}
        self.scalars = task_kernel.TaskScalars.make(spec, self.weights)  # for the fused kernel

    def get(self, dev: torch.device, acc: torch.dtype) -> TaskCoefficients:
        co = self.made.get((dev, acc))
        if co is None:
            co = self.made[(dev, acc)] = TaskCoefficients.make(self.spec, self.weights, acc, dev)
        return co

    def subset(self, prep: Prepared, names: list[str]) -> Prepared:
        """The entries of the candidates that take part (``prep`` holds all ``names``, in order)."""
        return Prepared(*(self.pick(part, names) for part in (prep.masks, prep.salts, prep.scales)))

    def pick(self, per_name: list, names: list[str]) -> list:
        """The entries of ``per_name`` (one per name of ``names``, in order) of the candidates that take part."""
        return [per_name[names.index(n)] for n in self.names]


class Remixer:
    """Experts kept resident; :meth:`mix` writes a new soup into ONE live transformers model's tensors in
    place, without reloading anything. Bit-identical to :func:`write_soup` with the same candidates (same
    order), weights and dtype, whatever the placement.

    * ``device_map=None`` (single device, as before): the model on ``device`` (default: the GPU if there is
      one); the experts on it too if they all fit with 2 GiB to spare, else in host memory.
    * ``device_map`` = {module prefix: device} or ``"auto"``/``"balanced"``/... (then ``device`` must be None;
      ``max_memory`` as in transformers): the model is loaded sharded; ``expert_placement`` says where each
      expert tensor lives: ``"with_shard"`` (the live tensor's device; SoupError when a GPU lacks room),
      ``"host"`` (host memory, page-locked when CUDA is there and ``pin_host``; streamed per tensor), ``"auto"``
      (the default with a map: beside the shard while the GPU keeps ``headroom`` bytes free, else host).
      Without a map, ``expert_placement`` applies to the one device the same way.
      Modules mapped to ``"cpu"`` beside GPUs are offloaded by accelerate (run on the GPU); their host
      tensors are re-mixed in place. ``"disk"`` is refused.

    The model is loaded once from the first candidate with ``AutoModelForCausalLM`` (never
    ``trust_remote_code``). Inputs go to :attr:`device` (the input embeddings' execution device).
    """

    def __init__(
        self,
        models: Mapping[str, str | Path],
        device: str | None = None,
        dtype: str | None = None,
        *,
        device_map: Mapping[str, Any] | str | None = None,
        max_memory: Mapping[Any, Any] | None = None,
        expert_placement: str | None = None,
        pin_host: bool = True,
        headroom: int = HEADROOM_BYTES,
        merge: MergeSpec | Mapping[str, Any] | None = None,
        base: str | Path | None = None,
    ):
        mp, _, self.duplicates = _dedup(models)
        self.names = list(mp)
        self.spec = _merge_spec(merge)
        bp = _base_path(self.spec, base)
        out_dt = _dtype(dtype)
        ckpts = _open_all({**mp, **dict([bp] if bp else [])}, mixed_ok=out_dt is not None)
        self.base_ckpt = ckpts.pop() if bp else None
        self.ckpts = ckpts
        self.out_dtype = out_dt
        self._load_model(ckpts[0], device, device_map, max_memory)
        targets, self.aliases = self._map_keys(self.model, ckpts[0])
        # GPU shards first: their work is queued asynchronously, then a CPU shard's (synchronous) re-mix runs
        self.targets = dict(sorted(targets.items(), key=lambda kv: kv[1].device.type == "cpu"))
        resident = ckpts + ([self.base_ckpt] if self.base_ckpt else [])
        legacy = expert_placement is None and device_map is None
        if legacy:  # the single-device rule: all experts beside the model or all in (unpinned) host memory
            where = dict.fromkeys(self.targets, self._expert_device(resident))
        else:
            nbytes = {k: sum(c.tensors[k].end - c.tensors[k].begin for c in resident) for k in self.targets}
            live = {k: t.device for k, t in self.targets.items()}
            where = place.plan_experts(live, nbytes, expert_placement or "auto", headroom)
        self._maps = _Maps()
        self._arena = self._host_arena(resident, where, pin_host and not legacy)
        self.experts: dict[str, dict[str, torch.Tensor]] = {}
        for c in resident:
            self.experts[c.name] = {
                k: self._load(info, where[k], self.targets[k].device) for k, info in c.tensors.items()
            }
        self.base_tensors = self.experts.pop(self.base_ckpt.name) if self.base_ckpt else None
        self._prep = self._prepare_all() if self.base_ckpt else {}
        # the rescale factors as float32 values in Python floats: arguments of the fused kernel, read once
        self._factors = {k: [None if t is None else float(t) for t in p.scales] for k, p in self._prep.items()}
        devs = set(where.values())
        self.expert_device = next(iter(devs)) if len(devs) == 1 else None  # None: experts on several devices
        self.devices = sorted({t.device for t in self.targets.values()} | devs, key=str)
        self._slots: dict[torch.device, _Slot] = {}

    def _load_model(
        self,
        ckpt: Checkpoint,
        device: str | None,
        device_map: Mapping[str, Any] | str | None,
        max_memory: Mapping[Any, Any] | None,
    ) -> None:
        """The live model, from ``ckpt`` (never remote code), on ``device`` or dispatched by ``device_map``."""
        from transformers import AutoModelForCausalLM

        kw: dict[str, Any] = {"dtype": self.out_dtype if self.out_dtype is not None else "auto"}
        if device_map is None:
            self.device = _device(device)
            self.model = AutoModelForCausalLM.from_pretrained(ckpt.path, trust_remote_code=False, **kw)
            self.model.to(self.device).eval()
        else:
            if device is not None:
                raise SoupError("Remixer: give device or device_map, not both")
            kw.update(device_map=check_device_map(device_map), max_memory=dict(max_memory) if max_memory else None)
            self.model = AutoModelForCausalLM.from_pretrained(ckpt.path, trust_remote_code=False, **kw).eval()
            self.device = _input_device(self.model)

    def _prepare_all(self, workers: int = 0) -> dict[str, Prepared]:
        """Each floating tensor's :class:`Prepared` for every candidate, computed once on the CPU from the
        files (TIES' trims on a thread pool), kept beside its live tensor: masks as bits (1/8 byte per
        element and candidate), DARE's salts, rescale factors."""
        base = self.base_ckpt
        keys = [k for k in self.targets if ST_DTYPES[base.tensors[k].dtype] in AVERAGED and base.tensors[k].numel]
        spec = self.spec

        def one(key: str) -> Prepared:
            infos = [c.tensors[key] for c in self.ckpts]
            acc = _acc_dtype(*(ST_DTYPES[i.dtype] for i in [*infos, base.tensors[key]]))

            def read(j: int, start: int, count: int) -> torch.Tensor:
                return self._maps.view(infos[j] if j >= 0 else base.tensors[key], start, count)

            return prepare(spec, key, self.names, read, infos[0].numel, acc).to(self.targets[key].device)

        if spec.op.sparsify is None or spec.density >= 1:
            return {k: one(k) for k in keys}
        with ThreadPoolExecutor(workers or _default_workers(), thread_name_prefix="soce-prep") as pool:
            return dict(zip(keys, pool.map(one, keys), strict=True))

    @staticmethod
    def _map_keys(model, ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """File key -> the live tensor holding that parameter or buffer's values; and file key -> copies of a
        tied parameter that a device map placed apart from it (re-mixed to the same bits). Other parameters
        absent from the file must share storage with a mapped one."""
        named = live_tensors(model)
        targets: dict[str, torch.Tensor] = {}
        for key, info in ckpt.tensors.items():
            t = named.get(key)
            if t is None:
                raise SoupError(
                    f"{info.file}: tensor {key!r} has no parameter in the loaded"
                    f" {type(model).__name__} (renamed at load time?); use write_soup instead"
                )
            if tuple(t.shape) != info.shape:
                raise SoupError(
                    f"{info.file}: tensor {key!r} shape {list(info.shape)} != model parameter {list(t.shape)}"
                )
            targets[key] = t
        ptrs = {(t.device, t.data_ptr()) for t in targets.values()}
        ties = place.tied_keys(model)
        aliases: dict[str, list[torch.Tensor]] = {}
        for name, _ in model.named_parameters(remove_duplicate=False):
            t = named[name]
            if name in targets or (t.device, t.data_ptr()) in ptrs:
                continue
            src = ties.get(name)
            if src in targets and t.shape == targets[src].shape:
                aliases.setdefault(src, []).append(t)
                ptrs.add((t.device, t.data_ptr()))
                continue
            raise SoupError(
                f"{ckpt.path}: model parameter {name!r} is not in the checkpoint files and not tied to one that is"
            )
        return targets, aliases

    def _expert_device(self, ckpts: list[Checkpoint]) -> torch.device:
        if self.device.type != "cuda":
            return self.device
        need = sum(i.end - i.begin for c in ckpts for i in c.tensors.values())
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need + (2 << 30) < free else HOST

    def _host_arena(self, ckpts: list[Checkpoint], where: dict[str, torch.device], pin: bool) -> HostArena | None:
        """Page-locked host memory for the experts streamed to a GPU shard (None: none are, or not pinned)."""
        keys = [k for k, d in where.items() if d.type == "cpu" and self.targets[k].device.type == "cuda"]
        if not keys or not pin or not torch.cuda.is_available():
            return None
        return HostArena(sum(-(-(c.tensors[k].end - c.tensors[k].begin) // 64) * 64 for c in ckpts for k in keys))

    def _load(self, info: TensorInfo, dev: torch.device, live: torch.device) -> torch.Tensor:
        t = self._maps.view(info, 0, info.numel)
        if dev.type != "cpu":
            return t.to(dev)
        if live.type == "cuda" and self._arena is not None:
            return self._arena.take(t)  # streamed to the GPU at each re-mix: from page-locked memory
        return t  # zero-copy view of the memory-mapped file (shared with the page cache)

    def _slot(self, dev: torch.device) -> _Slot:
        s = self._slots.get(dev)
        if s is None:
            s = self._slots[dev] = _Slot(dev)
        return s

    def synchronize(self) -> None:
        """Wait for the re-mix queued on every GPU of the model (to time it)."""
        for d in self.devices:
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    @torch.no_grad()
    def mix(self, weights: Mapping[str, float], allow_nonfinite: bool = False) -> Any:
        """Write the soup with ``weights`` (subset allowed, missing = 0; linear: normalised to sum 1; other
        operators: as :func:`write_soup` takes them) into ``self.model`` in place and return the model.
        Asynchronous on CUDA (:meth:`synchronize` to time it).
        NaN/inf in the soup raise SoupError (tensor and file) unless ``allow_nonfinite`` (one sync per device)."""
        merged: dict[str, Any] = {}
        for n, w in weights.items():
            tgt = self.duplicates.get(n, n)
            merged[tgt] = (float(merged[tgt]) + float(w)) if tgt in merged else w
        ws = check_weights(self.names, merged, subset=True, signed=self.base_ckpt is not None)
        used = [n for n in self.names if n in ws]
        coeffs = _Coeffs([ws[n] for n in used]) if self.base_ckpt is None else _TaskCoeffs(self.spec, used, ws)
        for key, target in self.targets.items():
            srcs = [self.experts[n][key] for n in used]
            flat = target.data.view(-1)
            src_dt = srcs[0].dtype
            if src_dt not in AVERAGED:
                flat.copy_(srcs[0])
            elif self.base_ckpt is not None:
                self._mix_task(key, flat, srcs, coeffs, self.out_dtype or src_dt)
            else:  # round as write_soup does, even if the model's dtype differs
                self._mix_tensor(flat, srcs, coeffs, self.out_dtype or src_dt)
            for copy in self.aliases.get(key, ()):  # a tie that the device map broke: same bits in the copy
                copy.data.view(-1).copy_(flat)
        if not allow_nonfinite:
            sources = [(c, self.experts[c.name]) for c in self.ckpts if c.name in ws]
            check_finite(self.targets, sources + ([(self.base_ckpt, self.base_tensors)] if self.base_ckpt else []))
        return self.model

    def _mix_task(
        self, key: str, flat: torch.Tensor, srcs: list[torch.Tensor], coeffs: _TaskCoeffs, out_dt: torch.dtype
    ) -> None:
        """``flat`` (the live tensor, 1-D) <- a task-vector soup of ``srcs``, computed on ``flat``'s device in
        chunks (experts held elsewhere are copied there chunk by chunk): one fused kernel per chunk where
        :func:`task_kernel.applies` (a resident tensor is one chunk), else :func:`task_vectors.mix_chunk`."""
        dev = flat.device
        base = self.base_tensors[key]
        acc = _acc_dtype(base.dtype, *(x.dtype for x in srcs))
        prep = coeffs.subset(self._prep[key], self.names)
        fused = acc == torch.float32 and task_kernel.applies(self.spec, dev, len(srcs), prep.salts)
        chunk = CHUNK_ELEMS if dev.type == "cpu" else TASK_GPU_CHUNK_ELEMS
        if fused and all(x.device == dev for x in [base, *srcs]):  # resident: the whole tensor in one launch
            chunk = max(flat.numel(), 1)
        factors = coeffs.pick(self._factors[key], self.names)
        slot = self._slot(dev)
        for s, n in _chunks(flat.numel(), chunk):
            dst = flat[s : s + n] if flat.dtype == out_dt else slot.get("out", out_dt, n)
            parts = [x[s : s + n].to(dev, non_blocking=True) for x in srcs]
            b = base[s : s + n].to(dev, non_blocking=True)
            done = fused and task_kernel.fused_task(dst, parts, b, self.spec, prep.masks, factors, coeffs.scalars, s)
            if not done:
                mix_chunk(dst, parts, b, self.spec, prep, coeffs.get(dev, acc), s, slot.get)
            if flat.dtype != out_dt:
                flat[s : s + n].copy_(dst)

    def _mix_tensor(self, flat: torch.Tensor, srcs: list[torch.Tensor], coeffs: _Coeffs, out_dt: torch.dtype) -> None:
        """``flat`` (the live tensor, 1-D) <- the soup of ``srcs``, computed where the experts are."""
        dev = srcs[0].device
        if flat.device != dev:
            return self._stream(flat, srcs, coeffs, out_dt)
        acc_dt = _acc_dtype(*(x.dtype for x in srcs))
        direct = flat.dtype == out_dt
        fused = coeffs.fused(dev)
        if direct and fused is not None and gpu_mix.fused_mix(flat, srcs, *fused):
            return None
        chunk = CHUNK_ELEMS if dev.type == "cpu" else GPU_CHUNK_ELEMS
        slot = self._slot(dev)
        for s, n in _chunks(flat.numel(), chunk):
            dst = flat[s : s + n] if direct else slot.get("out", out_dt, n)
            tmp = slot.get("tmp", acc_dt, n) if dev.type == "cpu" else None
            mix_into(dst, [x[s : s + n] for x in srcs], coeffs.get(dev, acc_dt), slot.get("acc", acc_dt, n), tmp)
            if not direct:
                flat[s : s + n].copy_(dst)
        return None

    def _stream(self, flat: torch.Tensor, srcs: list[torch.Tensor], coeffs: _Coeffs, out_dt: torch.dtype) -> None:
        """Host experts -> the live tensor's device, chunk by chunk (copies queued on that device's stream, so
        a staging buffer is reused only after the kernel that read it), soup computed there."""
        dev = flat.device
        acc_dt = _acc_dtype(*(x.dtype for x in srcs))
        fused = coeffs.fused(dev)
        slot = self._slot(dev)
        for s, n in _chunks(flat.numel(), STREAM_CHUNK_ELEMS):
            staged = [
                slot.get(f"src{j}", x.dtype, n).copy_(x[s : s + n], non_blocking=True) for j, x in enumerate(srcs)
            ]
            dst = flat[s : s + n]
            if flat.dtype == out_dt and fused is not None and gpu_mix.fused_mix(dst, staged, *fused):
                continue
            out = dst if flat.dtype == out_dt else slot.get("out", out_dt, n)
            tmp = slot.get("tmp", acc_dt, n) if dev.type == "cpu" else None
            mix_into(out, staged, coeffs.get(dev, acc_dt), slot.get("acc", acc_dt, n), tmp)
            if out is not dst:
                dst.copy_(out)


def _input_device(model: Any) -> torch.device:
    """Where a sharded model takes its inputs: the input embeddings' execution device."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    d = getattr(hook, "execution_device", None)
    return as_device(d) if d is not None else emb.weight.device
