"""Search points spread over devices: several soup evaluations at once, one worker per GPU (or per group of
GPUs holding one sharded model).

A *worker* is a callable ``{ingredient: weight} -> result dict`` that owns its own Remixer, live model and
evaluator. :func:`evaluate_points` hands each worker the next point not yet taken (so fast and slow workers
share the load) and returns the results in point order: the same list as ``[workers[0](p) for p in points]``
when the workers are equivalent (same soup bits give the same scores, whichever device computed them).

Threads or processes: the driving is always done by threads, one per worker; each thread spends its time
waiting, either inside torch/CUDA (which release the GIL) or on a pipe. A worker can be

* an in-process callable: cheap, shares nothing but the GIL. Right when the evaluation's time is GPU work
  (forward passes; the re-mix's Python loop is ~1 ms per 100 tensors).
* a :class:`ProcessWorker`: the evaluation runs in its own spawned process, built there by a factory. Needed
  when the evaluation is Python-heavy (lm-eval's request building, tokenisation and metric code hold the GIL)
  or touches process-global state (lm-eval seeds ``random``/numpy/torch globally in every call). The
  ``bench/sharded_remix.py`` figures (``parallel`` section) measure both.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Point = dict[str, float]
Worker = Callable[[Point], dict]
OnDone = Callable[[int, Point, dict], None]


class WorkerError(RuntimeError):
    """An evaluation failed in a worker process; the message carries the worker's traceback."""


def evaluate_points(workers: Sequence[Worker], points: Sequence[Point], on_done: OnDone | None = None) -> list[dict]:
    """Evaluate ``points`` on ``workers`` (one thread each, dynamic assignment) and return the results in
    point order. ``on_done(index, point, result)`` is called as each finishes (completion order, one call at
    a time). The first failing point (lowest index) re-raises its exception once all threads stopped; no new
    point is started after a failure. One worker (or one point): plain serial loop in this thread."""
    if not workers:
        raise ValueError("evaluate_points: no workers")
    if len(workers) == 1 or len(points) <= 1:
        out = []
        for i, p in enumerate(points):
            out.append(workers[0](p))
            if on_done is not None:
                on_done(i, p, out[-1])
        return out
    results: list[Any] = [None] * len(points)
    errors: dict[int, BaseException] = {}
    lock = threading.Lock()
    todo = iter(range(len(points)))

    def drive(worker: Worker) -> None:
        while True:
            with lock:
                i = next(todo, None) if not errors else None
            if i is None:
                return
            try:
                r = worker(points[i])
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                with lock:
                    errors[i] = e
                return
            results[i] = r
            if on_done is not None:
                with lock:
                    on_done(i, points[i], r)

    threads = [
        threading.Thread(target=drive, args=(w,), name=f"soce-points-{k}", daemon=True) for k, w in enumerate(workers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[min(errors)]
    return results


def _serve(conn: Any, factory: Callable[..., Worker], args: tuple, env: Mapping[str, str]) -> None:
    """The worker process: set ``env`` (before torch initialises CUDA), build the worker, answer points."""
    os.environ.update(env)
    try:
        fn = factory(*args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            kind, point = conn.recv()
        except EOFError:
            return
        if kind == "stop":
            return
        try:
            conn.send(("ok", fn(point)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            conn.send(("error", traceback.format_exc()))


class ProcessWorker:
    """A worker whose evaluations run in its own process (spawned, never forked: CUDA does not survive a
    fork). ``factory(*args)`` runs once there and returns the evaluate callable (it builds the Remixer, model
    and evaluator on the device it is told); ``env`` is set first (e.g. ``CUDA_VISIBLE_DEVICES``). The
    factory must be importable (a module-level function), ``args`` free of CUDA tensors (unpickling them would
    start CUDA before ``env`` is set), and points and results picklable. Starting returns
    at once; the first call waits until the worker is built. Use as a context manager, or :meth:`close`."""

    def __init__(self, factory: Callable[..., Worker], *args: Any, env: Mapping[str, str] | None = None):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve,
            args=(child, factory, args, dict(env or {})),
            daemon=True,
            name=f"soce-worker-{getattr(factory, '__name__', 'factory')}",
        )
        self._proc.start()
        child.close()
        self.pid: int | None = None

    def _recv(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise WorkerError(f"worker process {self._proc.pid} died (exit code {self._proc.exitcode})") from None

    def ready(self) -> int:
        """Wait until the worker is built; returns its process id. Raises WorkerError if building failed."""
        if self.pid is None:
            kind, val = self._recv()
            if kind != "ready":
                raise WorkerError(f"building the worker failed:\n{val}")
            self.pid = val
        return self.pid

    def __call__(self, point: Point) -> dict:
        self.ready()
        self._conn.send(("point", point))
        kind, val = self._recv()
        if kind != "ok":
            raise WorkerError(f"evaluating {point} failed in worker {self.pid}:\n{val}")
        return val

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker process (terminated if it does not exit within ``timeout`` seconds)."""
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)
        self._conn.close()

    def __enter__(self) -> ProcessWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def replay(points: Sequence[Point], results: Sequence[dict]) -> Worker:
    """An evaluate function answering ``points`` from precomputed ``results`` (same order), so that a serial
    search loop (:func:`soce.method.search_weights`: trace, ``on_point`` logging, best point with ties to the
    earlier one) runs unchanged over a parallel evaluation. Another point raises KeyError."""
    table = {_point_key(p): r for p, r in zip(points, results, strict=True)}

    def evaluate(point: Point) -> dict:
        return table[_point_key(point)]

    return evaluate


def _point_key(point: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((k, float(v)) for k, v in point.items()))


def device_groups(n_devices: int, per_worker: int = 1) -> list[list[int]]:
    """GPU indices per worker: consecutive groups of ``per_worker`` (a sharded model per group); leftover
    devices are unused. ``device_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]``."""
    if per_worker < 1:
        raise ValueError("per_worker must be >= 1")
    return [list(range(s, s + per_worker)) for s in range(0, n_devices - per_worker + 1, per_worker)]


def remixer_placement(group: Sequence[int], gpu_bytes: int | None = None) -> dict[str, Any]:
    """Remixer keyword arguments for one worker's GPU group: one GPU -> ``{"device": "cuda:i"}``; several ->
    the model balanced over them (``device_map="auto"``, ``max_memory`` naming only the group, ``gpu_bytes``
    each; default 90% of each GPU's memory) with the experts placed ``"auto"`` (beside their shard while the
    GPU has room, else pinned host memory)."""
    if len(group) == 1:
        return {"device": f"cuda:{group[0]}"}
    if gpu_bytes is None:
        import torch

        gpu_bytes = int(0.9 * min(torch.cuda.get_device_properties(g).total_memory for g in group))
    return {"device_map": "auto", "max_memory": dict.fromkeys(group, gpu_bytes), "expert_placement": "auto"}
