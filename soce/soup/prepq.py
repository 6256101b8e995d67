"""The writer's preparation pool: per-tensor work (TIES' trims) on a few threads, within a memory budget.

Tasks are started in submission order, each when its memory ``cost`` fits the budget left (a task that
alone exceeds the budget starts when nothing else runs) and its position is within ``window`` elements of
the writer's; a thread that cannot start the first waiting task starts the first one that fits. So the
big trims (embeddings) run one at a time while the other threads trim smaller tensors, and results (packed
masks) are not computed far ahead of the writer.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps a task's freed buffers in its thread's arena)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None


@dataclass
class _Task:
    fn: Callable[[], Any]
    cost: int
    pos: int  # elements of the tensors before this one, in write order
    future: Future = field(default_factory=Future)


class PrepQueue:
    """``threads`` workers; ``budget`` bytes of task cost at once; ``window`` elements of look-ahead."""

    def __init__(self, threads: int, budget: int, window: int) -> None:
        self.budget, self.window = budget, window
        self.free, self.running, self.reached = budget, 0, 0
        self.tasks: list[_Task] = []
        self.cond = threading.Condition()
        self.closed = False
        self.threads = [threading.Thread(target=self._work, name=f"soce-prep-{i}", daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def submit(self, fn: Callable[[], Any], cost: int, pos: int) -> Future:
        """Queue ``fn`` (``cost`` bytes while it runs; its tensor starts at element ``pos``)."""
        task = _Task(fn, cost, pos)
        with self.cond:
            self.tasks.append(task)
            self.cond.notify()
        return task.future

    def reach(self, pos: int) -> None:
        """The writer has reached element ``pos``: tasks up to ``pos + window`` may start."""
        with self.cond:
            self.reached = max(self.reached, pos)
            self.cond.notify_all()

    def _pick(self) -> _Task | None:
        for i, t in enumerate(self.tasks):
            if t.pos > self.reached + self.window:
                break
            if t.cost <= self.free or self.running == 0:
                return self.tasks.pop(i)
        return None

    def _work(self) -> None:
        while True:
            with self.cond:
                task = self._pick()
                while task is None and not self.closed:
                    self.cond.wait()
                    task = self._pick()
                if task is None:
                    return
                self.free -= task.cost
                self.running += 1
            try:
                if task.future.set_running_or_notify_cancel():
                    task.future.set_result(task.fn())
            except BaseException as e:  # delivered to the chunk that waits for it
                task.future.set_exception(e)
            finally:
                _trim_heap()
                with self.cond:
                    self.free += task.cost
                    self.running -= 1
                    self.cond.notify_all()

    def close(self) -> None:
        """Cancel what has not started, let running tasks finish, stop the threads."""
        with self.cond:
            self.closed = True
            for t in self.tasks:
                t.future.cancel()
            self.tasks.clear()
            self.cond.notify_all()
        for t in self.threads:
            t.join()
