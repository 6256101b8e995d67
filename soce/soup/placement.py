"""Placement of a sharded live model and of the experts beside it (used by :class:`soce.soup.Remixer`).

* The live model may be spread over several devices (transformers ``device_map``; accelerate's hooks move the
  activations between shards). A module mapped to ``"cpu"`` while a GPU is in the map is *offloaded* by
  accelerate: its parameters sit on ``meta`` and the host tensors in its hook's ``weights_map`` are copied to
  the execution GPU at every forward. :func:`live_tensors` finds the tensor that really holds each value, so a
  re-mix written into it takes effect at the next forward.
* Experts are kept per tensor either beside the live tensor's shard (same device) or in host memory (pinned,
  streamed per tensor to the shard's GPU at each re-mix). :func:`plan_experts` decides, per tensor key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from soce.soup.io import SoupError

HOST = torch.device("cpu")
MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # what transformers computes itself
PLACEMENTS = ("auto", "with_shard", "host")
HEADROOM_BYTES = 2 << 30  # left free on each GPU beside the experts (activations of the evaluation)


def as_device(d: str | int | torch.device) -> torch.device:
    """A torch device with an index for CUDA (``cuda`` -> ``cuda:<current>``, ``1`` -> ``cuda:1``), so that it
    compares equal to a tensor's ``.device``."""
    dev = torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def check_device_map(device_map: Mapping[str, Any] | str) -> dict[str, str] | str:
    """Validate a device map: one of :data:`MAP_STRATEGIES`, or {module prefix: device} with devices as
    ``"cpu"``, ``"cuda:1"`` or an int. Returns it with devices as strings. ``"disk"`` is refused: disk-offloaded
    tensors are re-read from their files at every forward, so an in-place re-mix cannot reach them."""
    if isinstance(device_map, str):
        if device_map not in MAP_STRATEGIES:
            raise SoupError(f"device_map {device_map!r}: use a dict or one of {', '.join(MAP_STRATEGIES)}")
        return device_map
    if not device_map:
        raise SoupError("device_map: empty")
    out: dict[str, str] = {}
    for prefix, d in device_map.items():
        if d == "disk":
            raise SoupError(f"device_map[{prefix!r}] = 'disk': disk offload cannot be re-mixed in place; use 'cpu'")
        try:
            out[str(prefix)] = "cuda:0" if d == "cuda" else str(as_device(d))
        except (RuntimeError, ValueError) as e:
            raise SoupError(f"device_map[{prefix!r}] = {d!r}: not a device ({e})") from None
    return out


def _offloaded(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The host tensor that accelerate copies to the GPU at each forward for ``name``: held by the
    ``weights_map`` of the offload hook of its module or of an enclosing one (keys relative to that module)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:cut])), "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
            wm = getattr(h, "weights_map", None)
            rel = ".".join(parts[cut:])
            if h is None or wm is None or not getattr(h, "offload", False) or rel not in wm:
                continue
            t = wm[rel]
            if t.device.type == "meta" or t.data_ptr() != wm[rel].data_ptr():  # re-read at each access: disk
                raise SoupError(f"model tensor {name!r} is offloaded to disk: it cannot be re-mixed in place")
            return t
    raise SoupError(f"model tensor {name!r} is on the meta device and no offload hook holds its values")


def tied_keys(model: torch.nn.Module) -> dict[str, str]:
    """Tied parameter name -> the name it is tied to (transformers 5: ``all_tied_weights_keys``; older 5.x
    releases: the class's ``_tied_weights_keys`` dict, when the config ties the embeddings)."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if keys is None:
        cls_keys = getattr(model, "_tied_weights_keys", None)
        tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        keys = cls_keys if isinstance(cls_keys, dict) and tie else {}
    return dict(keys)


def live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer name of ``model`` (tied duplicates included) -> the tensor holding its
    values: the parameter itself, or for an accelerate-offloaded module the host tensor of its hook."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {n: (_offloaded(model, n) if t.device.type == "meta" else t) for n, t in named}


@dataclass
class HostArena:
    """One host buffer for the experts kept in host memory; page-locked (``cudaHostRegister``, portable to
    every GPU) when CUDA is there, so that the per-tensor copies to a GPU run at full link speed and
    asynchronously. Pinning a plain allocation avoids the power-of-two rounding of torch's pinned allocator."""

    nbytes: int
    pin: bool = True
    buf: torch.Tensor = field(init=False)
    pinned: bool = field(init=False, default=False)
    used: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.buf = torch.empty(max(self.nbytes, 1), dtype=torch.uint8)
        if self.pin and self.nbytes and torch.cuda.is_available():
            err = int(torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), self.buf.numel(), 1))
            if err != 0:
                raise SoupError(
                    f"pinning {self.nbytes / 2**30:.1f} GiB of host memory for the experts failed"
                    f" (cudaError {err}); pass pin_host=False"
                )
            self.pinned = True

    def take(self, src: torch.Tensor) -> torch.Tensor:
        """A copy of ``src`` (1-D) in the arena, aligned to 64 bytes."""
        n = src.numel() * src.element_size()
        start = -(-self.used // 64) * 64
        if start + n > self.buf.numel():
            raise SoupError("host arena overflow (internal: sizes were planned from the headers)")
        self.used = start + n
        return self.buf[start : start + n].view(src.dtype).copy_(src)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.pinned = False

    def __del__(self) -> None:  # pragma: no cover - timing of GC
        try:
            self.close()
        except Exception:
            pass


def free_bytes(dev: torch.device) -> int:
    """Free memory on ``dev`` in bytes (CUDA: what the driver reports; host: unbounded here)."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    return 1 << 62


def plan_experts(
    live: Mapping[str, torch.device],
    nbytes: Mapping[str, int],
    placement: str,
    headroom: int = HEADROOM_BYTES,
    free: Mapping[torch.device, int] | None = None,
) -> dict[str, torch.device]:
    """Tensor key -> device of its experts. ``live``: key -> device of the live tensor; ``nbytes``: key -> bytes
    of all experts' copies of it. ``with_shard``: beside the live tensor (SoupError if a GPU lacks room),
    ``host``: host memory, ``auto``: beside it while the GPU keeps ``headroom`` bytes free, then host (keys in
    order). CPU shards always keep their experts in host memory. ``free``: bytes free per GPU (default: asked
    of the driver now)."""
    if placement not in PLACEMENTS:
        raise SoupError(f"expert_placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
    given = free or {}
    avail = {d: given[d] if d in given else free_bytes(d) for d in set(live.values()) if d.type != "cpu"}
    budget = {d: f - headroom for d, f in avail.items()}
    out: dict[str, torch.device] = {}
    for key, dev in live.items():
        if dev.type == "cpu" or placement == "host":
            out[key] = HOST
        elif nbytes[key] <= budget[dev]:
            budget[dev] -= nbytes[key]
            out[key] = dev
        elif placement == "auto":
            out[key] = HOST
        else:
            need = sum(nbytes[k] for k, d in live.items() if d == dev)
            raise SoupError(
                f"expert_placement='with_shard': the experts of {dev}'s shard need {need / 2**30:.1f}"
                f" GiB, {dev} has {(avail[dev] - headroom) / 2**30:.1f} GiB to spare; use"
                " expert_placement='auto' or 'host', or spread the model over more devices"
            )
    return out
