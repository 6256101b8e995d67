"""The in-memory Remixer: experts resident, each new soup written into one live model in place."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from soce.soup import kernel as gpu_mix
from soce.soup.arith import CHUNK_ELEMS, GPU_CHUNK_ELEMS, Coefficients, _acc_dtype, _chunks, mix_into
from soce.soup.checks import _dedup, _dtype, _open_all, check_weights
from soce.soup.io import AVERAGED, Checkpoint, SoupError, TensorInfo, _Maps
from soce.soup.writer import _Slot


def _device(device: str | None) -> torch.device:
    """The torch device, with an index for CUDA (``cuda`` -> ``cuda:0``), so that it compares equal to a
    tensor's ``.device`` (a bare ``cuda`` does not, which silently took the slow path)."""
    d = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d




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
