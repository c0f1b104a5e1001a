"""Rank worker and node fetcher classes that inject real faults, swapped in with
``load(worker_cls=..., fetcher_cls=...)``.

They are built by factories so each test sets its own victim and marker folder; Ray pickles the
classes by value (``register_pickle_by_value``), so workers need not import the tests package. A death
is a real ``SIGKILL`` of the process (as the OOM killer or a preempted machine would do); attempts
are counted in marker files, across processes, so a victim dies only on its first ``times`` attempts.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import ray.cloudpickle

from workers.sources.hub_fetcher import NodeFetcher
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


def preloaded_planner(marker_dir: str) -> type:
    """A worker that says its process is preloaded (``workers.preload``) and leaves ``planned-<rank>`` in
    ``marker_dir`` once it has made a plan with ``plan_here``."""

    class PreloadedPlanner(RankWorker):
        def where(self):
            return {**super().where(), "preloaded": True}

        def plan_here(self, resolved, options):
            plan = super().plan_here(resolved, options)
            open(os.path.join(marker_dir, f"planned-{self.rank}"), "w").close()
            return plan

    return PreloadedPlanner


def _next_attempt(marker_dir: str, name: str, times: int) -> bool:
    """True (and the attempt booked) while ``name`` has died fewer than ``times`` times."""
    attempts = len([f for f in os.listdir(marker_dir) if f.startswith(f"{name}-")])
    if attempts >= times:
        return False
    open(os.path.join(marker_dir, f"{name}-{attempts}"), "w").close()
    return True


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


RANK_PHASES = ("start", "import", "attach", "tie send", "tie receive", "finalize", "process group", "inference",
               "update weights")


def killed_in(phase: str, marker_dir: str, *, victim: int, times: int = 1, step: int = 0) -> type:
    """A worker whose rank ``victim`` SIGKILLs its own process in ``phase`` (markers ``<phase>-rank<victim>-<n>``):

    - ``start``: in its constructor, as soon as its process appears;
    - ``import``: when its background thread starts importing transformers' model code;
    - ``attach``: when it is handed the plan;
    - ``tie send`` / ``tie receive``: when it hands a tied tensor to another stage / receives one;
    - ``finalize``: when it builds its model;
    - ``process group``: when asked to join the inference process group (before joining: its peers
      wait for it);
    - ``inference``: in its ``step``-th ``forward_step`` (counted from 0 in each process), while its TP
      peers run the same step and wait for it in their collectives;
    - ``update weights``: when asked to read a new checkpoint into its tensors (``reload``).
    """
    if phase not in RANK_PHASES:
        raise ValueError(f"phase {phase!r}: expected one of {RANK_PHASES}")
    name = f"{phase.replace(' ', '-')}-rank{victim}"

    def maybe_die(rank: int) -> None:
        if rank == victim and _next_attempt(marker_dir, name, times):
            _die()

    class KilledIn(RankWorker):
        def __init__(self, plan, rank, **kwargs):
            if phase == "start":
                maybe_die(rank)
            if phase == "import" and rank == victim:
                def hook(event, args):
                    if event == "import" and args[0] == "transformers.modeling_utils":
                        maybe_die(rank)

                sys.addaudithook(hook)  # fires in the background thread that imports the model code
            self._steps = 0
            super().__init__(plan, rank, **kwargs)

        def attach(self, plan):
            if phase == "attach":
                maybe_die(self.rank)
            return super().attach(plan)

        def tied_for(self, to_rank):
            if phase == "tie send":
                maybe_die(self.rank)
            return super().tied_for(to_rank)

        def receive_tied(self, *parts):
            if phase == "tie receive":
                maybe_die(self.rank)
            return super().receive_tied(*parts)

        def finalize(self):
            if phase == "finalize":
                maybe_die(self.rank)
            return super().finalize()

        def init_inference(self, *args, **kwargs):
            if phase == "process group":
                maybe_die(self.rank)
            return super().init_inference(*args, **kwargs)

        def reload(self, *args, **kwargs):
            if phase == "update weights":
                maybe_die(self.rank)
            return super().reload(*args, **kwargs)

        def forward_step(self, *args, **kwargs):
            if phase == "inference" and self._steps == step:
                maybe_die(self.rank)
            self._steps += 1
            return super().forward_step(*args, **kwargs)

    KilledIn.__qualname__ = KilledIn.__name__ = f"KilledIn{phase.title().replace(' ', '')}"
    return KilledIn


def fetcher_killed_mid_fetch(marker_dir: str, *, node: int = 0, times: int = 1) -> type:
    """A node fetcher whose node ``node`` SIGKILLs its own process once its first bytes are on disk, on its
    first ``times`` attempts (markers ``fetcher-node<node>-<n>``)."""

    class FetcherKilledMidFetch(NodeFetcher):
        def _advance(self, n):
            super()._advance(n)
            if self.node == node and n > 0 and self._done > 0 and _next_attempt(marker_dir, f"fetcher-node{node}", times):
                _die()

    return FetcherKilledMidFetch


def records_pid(marker_dir: str) -> type:
    """A worker that writes its process id to ``pid-<rank>`` in ``marker_dir`` when it starts."""

    class RecordsPid(RankWorker):
        def __init__(self, plan, rank, **kwargs):
            super().__init__(plan, rank, **kwargs)
            with open(os.path.join(marker_dir, f"pid-{rank}"), "w") as f:
                f.write(str(os.getpid()))

    return RecordsPid


def fetcher_killing_rank(marker_dir: str, *, victim: int, node: int) -> type:
    """A node fetcher that, on node ``node``, SIGKILLs rank ``victim``'s process (its pid from
    ``records_pid``) as its fetch begins, once (marker ``fetch-killed-rank<victim>``): a rank dying while
    its node fetches."""

    class FetcherKillingRank(NodeFetcher):
        def fetch(self, token=None):
            if self.node == node and _next_attempt(marker_dir, f"fetch-killed-rank{victim}", 1):
                with open(os.path.join(marker_dir, f"pid-{victim}")) as f:
                    pid = int(f.read())
                os.kill(pid, signal.SIGKILL)
            return super().fetch(token=token)

    return FetcherKillingRank
