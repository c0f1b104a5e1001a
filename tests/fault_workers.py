"""Rank worker classes that inject real faults, swapped in with ``load(worker_cls=...)``.

They are built by factories so each test sets its own victim and marker folder; Ray pickles the
classes by value (``register_pickle_by_value``), so workers need not import the tests package.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import ray.cloudpickle

from workers.rank_worker import RankWorker

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def killed_mid_load(marker_dir: str, *, victim: int, after_items: int = 3, times: int = 1) -> type:
    """A worker whose rank ``victim`` SIGKILLs its own process after ``after_items`` pieces of its load
    (each chunk read, each tensor mapped),
    on its first ``times`` attempts (attempts are counted in marker files, across processes)."""

    class KilledMidLoad(RankWorker):
        def load(self, paths, bytes_fetched=0):
            attempts = len([f for f in os.listdir(marker_dir) if f.startswith(f"rank{self.rank}-")])
            if self.rank != victim or attempts >= times:
                return super().load(paths, bytes_fetched)
            open(os.path.join(marker_dir, f"rank{self.rank}-{attempts}"), "w").close()
            progress, original, count = self.progress, self.progress.add, [0]

            def advance_then_die(n):
                original(n)
                count[0] += 1
                if count[0] >= after_items:
                    os.kill(os.getpid(), signal.SIGKILL)

            progress.add = advance_then_die
            try:
                return super().load(paths, bytes_fetched)
            finally:
                progress.add = original

    return KilledMidLoad


def slow_load(seconds: float, *, marker_dir: str | None = None) -> type:
    """A worker that waits ``seconds`` before reading (leaving a marker file when it starts), so a test
    can break the cluster mid-load."""

    class SlowLoad(RankWorker):
        def load(self, paths, bytes_fetched=0):
            if marker_dir:
                open(os.path.join(marker_dir, f"loading-{self.rank}-{os.getpid()}"), "w").close()
            time.sleep(seconds)
            return super().load(paths, bytes_fetched)

    return SlowLoad


def announces_start(marker_dir: str) -> type:
    """A worker that leaves ``started-<rank>`` in ``marker_dir`` as soon as its actor is constructed."""

    class AnnouncesStart(RankWorker):
        def __init__(self, plan, rank, **kwargs):
            super().__init__(plan, rank, **kwargs)
            open(os.path.join(marker_dir, f"started-{rank}-{'with' if plan is not None else 'without'}-plan"), "w").close()

    return AnnouncesStart
