"""``RankHost``: the class Ray turns into a rank's actor; it builds the ``RankWorker`` inside the actor.

Ray needs the actor's class on the driver, so the driver imports the class's module. Were that
``workers.rank_worker``, every driver would import torch (1-1.5 s of CPU on a small machine) before
it could start a single rank. This module imports nothing heavy: the rank's own process imports the
worker class when the actor is constructed, and the driver starts the ranks at once.

Every call is ``call(method, *args, **kwargs)`` on the worker, so ``RankWorker`` and its test
subclasses stay plain classes. Ray still resolves object refs passed as top-level arguments (tied
tensors, the previous stage's activations) before ``call`` runs.

Runs on the driver (the class) and in each rank's process (the instance).
"""

from __future__ import annotations

from functools import cache


class RankHost:
    """Holds one rank's worker: ``worker_cls`` (default ``workers.rank_worker.RankWorker``) built with
    the remaining arguments."""

    def __init__(self, worker_cls: type | None, *args, **kwargs) -> None:
        if worker_cls is None:
            from workers.rank_worker import RankWorker as worker_cls
        self.worker = worker_cls(*args, **kwargs)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.worker, method)(*args, **kwargs)

    def call_stream(self, method: str, *args, **kwargs):
        """The items a generator method of the worker yields, one by one (a Ray streaming call)."""
        yield from getattr(self.worker, method)(*args, **kwargs)


@cache
def host_class(worker_cls: type | None) -> type:
    """A ``RankHost`` subclass named after the worker class, so Ray's actor list shows ``RankWorker``
    (or a test's fault worker) rather than the host. One per worker class, the same for every load of a
    driver: Ray sees one actor class, not a new one each time."""
    name = "RankWorker" if worker_cls is None else worker_cls.__qualname__
    return type(name.rsplit(".", 1)[-1], (RankHost,), {"__qualname__": name, "__module__": __name__})
