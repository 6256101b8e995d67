"""One GPU (or group of GPUs) per Hydra job process, for sweep mode through the joblib launcher.

The joblib launcher runs the jobs of a multirun in a pool of worker processes (loky), reused from job to job,
and tells a job nothing about which worker it is in. CUDA reads ``CUDA_VISIBLE_DEVICES`` once per process, at
its first CUDA call, so the GPU is claimed per *process*: at its first job, a worker process takes the first
free slot (``gpus_per_job`` consecutive GPUs) by an exclusive lock on a file (``fcntl.flock``: the kernel
releases it when the process exits, crash included) and sets ``CUDA_VISIBLE_DEVICES``; its later jobs keep
that slot. With ``hydra.launcher.n_jobs`` <= the number of slots every job process has GPUs of its own; a
process that finds no free slot waits for one (a sharded 70B soup does not survive sharing a GPU).

Enable it with one config entry (conf/hydra/default.yaml, or ``+hydra.callbacks.gpu_assign._target_=...`` on
the command line)::

    hydra:
      callbacks:
        gpu_assign:
          _target_: soce.search.gpu_assign.GpuAssign
          gpus_per_job: 1          # 2+ for a model sharded over several GPUs (device_map) per job
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)
_claimed: dict[str, Any] = {}  # this process's slot: {"gpus": [...], "fd": lock file descriptor}


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out, without initialising CUDA: ``CUDA_VISIBLE_DEVICES`` if set, else one
    per line of ``nvidia-smi -L``, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def _lock_dir(lock_dir: str | Path | None) -> Path:
    d = Path(lock_dir) if lock_dir else Path(tempfile.gettempdir()) / f"soce-gpu-locks-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _try_slots(slots: list[list[str]], lock_dir: Path) -> tuple[list[str], int] | None:
    for gpus in slots:
        fd = os.open(lock_dir / f"gpu-{'_'.join(gpus)}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return gpus, fd
    return None


def claim(
    gpus_per_job: int = 1, lock_dir: str | Path | None = None, poll_s: float = 1.0, timeout_s: float | None = None
) -> list[str] | None:
    """Claim a free slot of ``gpus_per_job`` GPUs for this process (once; later calls return the same) and set
    ``CUDA_VISIBLE_DEVICES`` to it. Returns the GPU ids, or None when there are no GPUs (CPU jobs). Waits
    (polling every ``poll_s`` seconds, up to ``timeout_s``; None: forever) while every slot is taken. Raises
    RuntimeError if CUDA is already initialised here (the setting could no longer take effect)."""
    if _claimed:
        return _claimed["gpus"]
    gpus = visible_gpus()
    if not gpus:
        return None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise RuntimeError("gpu_assign: CUDA is already initialised in this process; claim a GPU before any CUDA call")
    if gpus_per_job < 1 or gpus_per_job > len(gpus):
        raise ValueError(f"gpu_assign: gpus_per_job={gpus_per_job} with {len(gpus)} GPUs visible")
    slots = [gpus[s : s + gpus_per_job] for s in range(0, len(gpus) - gpus_per_job + 1, gpus_per_job)]
    d = _lock_dir(lock_dir)
    t0 = time.monotonic()
    while (got := _try_slots(slots, d)) is None:
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"gpu_assign: no free GPU slot of {len(slots)} in {timeout_s} s (n_jobs > slots?)")
        time.sleep(poll_s)
    _claimed.update(gpus=got[0], fd=got[1])
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(got[0])
    return got[0]


class GpuAssign(Callback):
    """Hydra callback: claim this job process's GPU slot at the start of its first job (:func:`claim`)."""

    def __init__(self, gpus_per_job: int = 1, lock_dir: str | None = None) -> None:
        self.gpus_per_job = int(gpus_per_job)
        self.lock_dir = lock_dir

    def on_job_start(self, config: Any = None, **kwargs: Any) -> None:
        gpus = claim(self.gpus_per_job, self.lock_dir)
        if gpus is not None:
            log.info("gpu_assign: process %d uses CUDA_VISIBLE_DEVICES=%s", os.getpid(), ",".join(gpus))
