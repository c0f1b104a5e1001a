"""The rank actors of one load: start them in the placement group, call them, restart them, stop them.

The worker class is a plain class (``workers.rank_worker.RankWorker``); here it runs in a Ray actor
(threaded, so the driver can poll progress while a load runs) hosted by ``workers.rank_host``, so the
driver starts ranks without importing torch; its methods are called by name. Every call to the ranks
waits with a deadline. ``call`` raises on failure, grouped by message — ``[Rank 0, 1] (node ...):
...`` — keeping the type of a user error raised on a rank (a truncated file, say). ``call_each`` instead returns
what succeeded and what failed, so the load can restart a rank whose actor died (its process was
killed, or its node was lost: Ray re-places the node's bundle if the cluster has room) and go on.

``shutdown`` kills every actor and removes the placement group; it is idempotent and runs on every
exit path of ``orchestrator.load``.

Runs on the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from orchestrator.placement import PlacementError, bundles_for, create_placement_group, remove
from planning.errors import MeshloadError
from planning.plan import LoadPlan
from workers.rank_host import host_class


class RankError(MeshloadError, RuntimeError):
    """One or more ranks failed; the message groups ranks by error."""


class RankTimeout(MeshloadError, TimeoutError):
    """Ranks did not finish a step within its deadline."""


def is_actor_death(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, RayActorError, ActorUnavailableError))


def _describe(exc: BaseException) -> tuple[type[BaseException], str]:
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if cause is not None:
            return type(cause), f"{type(cause).__name__}: {cause}"
        return RankError, str(exc).strip().splitlines()[-1]
    if is_actor_death(exc):
        return RankError, f"the rank's actor died ({str(exc).strip().splitlines()[0]})"
    return type(exc), f"{type(exc).__name__}: {exc}"


def group_errors(errors: dict[int, BaseException], where: dict[int, str]) -> BaseException:
    """One exception for many ranks: ``[Rank 0, 1] (node ...): message`` lines, typed when they agree."""
    by_message: dict[str, list[int]] = {}
    types = set()
    for rank in sorted(errors):
        exc_type, message = _describe(errors[rank])
        types.add(exc_type)
        by_message.setdefault(message, []).append(rank)
    lines = []
    for message, ranks in by_message.items():
        nodes = sorted({where.get(r, "?") for r in ranks})
        lines.append(f"[Rank {', '.join(map(str, ranks))}] (node {', '.join(nodes)}): {message}")
    text = "\n".join(lines)
    (only,) = types if len(types) == 1 else (None,)
    if only is not None and issubclass(only, MeshloadError) and only is not RankError:
        try:
            return only(text)
        except TypeError:
            pass
    return RankError(text)


class RankGroup:
    """The actors of one load, one per rank; rank ``r`` runs on node ``node_of_rank[r]`` (the plan's blocks).

    The actors can start before the plan exists (``start()`` without one, then ``attach(plan)``), so
    their process start and imports overlap the driver's planning."""

    def __init__(self, node_of_rank: Sequence[int], *, timeout_s: float) -> None:
        self.node_of_rank = list(node_of_rank)
        self.timeout_s = timeout_s
        self.actors: list = []
        self.pg = None
        self.where: dict[int, str] = {}
        self.node_ids: dict[int, str] = {}
        self.restarts: dict[int, int] = dict.fromkeys(range(len(self.node_of_rank)), 0)
        self._spawn: Callable[[int], object] | None = None
        self._plan_ref = None  # the plan in the object store, once attached: restarted ranks get it at once
        self._placement_timeout_s = 60.0

    def start(
        self,
        *,
        cpus_per_rank: float = 1,
        gpus_per_rank: float = 0,
        num_threads: int | None = None,
        env: dict[str, str] | None = None,
        worker_cls: type | None = None,
        worker_options: dict | None = None,
        placement_timeout_s: float = 60.0,
        poll: Callable[[], None] | None = None,
        plan: LoadPlan | None = None,
    ) -> "RankGroup":
        """Reserve the nodes and start one actor per rank — with ``plan`` when it is already known (a
        cached or given plan: each rank then checks its node can run it), else without (``attach``
        gives it later); returns once every actor answers. ``poll()`` is called while waiting (it may
        raise, e.g. when planning failed meanwhile)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if plan is not None:
            self._plan_ref = ray.put(plan)

        self._placement_timeout_s = placement_timeout_s
        num_nodes = max(self.node_of_rank) + 1
        bundles = bundles_for(self.node_of_rank, num_nodes, cpus_per_rank=cpus_per_rank, gpus_per_rank=gpus_per_rank)
        self.pg = create_placement_group(bundles, timeout_s=placement_timeout_s, name="", poll=poll)
        threads = num_threads or max(1, int(cpus_per_rank))
        # Only what a rank cannot set for itself goes through a runtime_env (its own worker pool, so no
        # reuse of idle workers); the thread count is set by the rank (torch.set_num_threads).
        runtime_env = {"env_vars": env} if env else None
        remote_cls = ray.remote(host_class(worker_cls))

        def spawn(rank: int):
            return remote_cls.options(
                num_cpus=cpus_per_rank,
                num_gpus=gpus_per_rank,
                max_concurrency=4,
                max_restarts=0,
                runtime_env=runtime_env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=self.node_of_rank[rank]
                ),
            ).remote(worker_cls, self._plan_ref, rank, num_threads=threads, **(worker_options or {}))

        self._spawn = spawn
        self.actors = [spawn(r) for r in range(len(self.node_of_rank))]
        for rank, info in enumerate(self.call("where", timeout_s=placement_timeout_s + 120, poll=poll)):
            self._record(rank, info)
        if plan is not None:
            self.call("check_kernels")
        return self

    @property
    def attached(self) -> bool:
        """Whether the ranks have their plan (given at start, or by ``attach``)."""
        return self._plan_ref is not None

    def attach(self, plan: LoadPlan) -> None:
        """Hand the plan to ranks started without one (each checks its node can run it)."""
        import ray

        self._plan_ref = ray.put(plan)
        self.call("attach", self._plan_ref)

    def _record(self, rank: int, info: dict) -> None:
        self.where[rank] = f"{info['node_ip'] or info['host']}"
        self.node_ids[rank] = info["node_id"]

    def restart(self, rank: int) -> None:
        """Replace ``rank``'s actor by a fresh one in the same bundle (Ray re-places the bundle if its node was lost).

        Right after a node is lost Ray may still place the new actor on it; such an actor dies at once,
        so we try again until one answers or ``placement_timeout_s`` has passed."""
        import ray

        self.restarts[rank] += 1
        old = self.where.get(rank, "?")
        deadline = time.monotonic() + self._placement_timeout_s
        while True:
            try:
                ray.kill(self.actors[rank], no_restart=True)
            except Exception:  # noqa: BLE001 - it is already dead
                pass
            self.actors[rank] = self._spawn(rank)
            remaining = deadline - time.monotonic()
            try:
                info = self.call("where", ranks=[rank], timeout_s=max(remaining, 1.0))[0]
                break
            except RankTimeout:
                raise PlacementError(
                    f"rank {rank} (was on node {old}) could not be restarted within {self._placement_timeout_s:g}s: "
                    f"its node is gone and the cluster has no room to re-place it"
                ) from None
            except RankError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
        self._record(rank, info)

    def submit(
        self,
        method: str,
        *args,
        per_rank_args: Sequence[tuple] | None = None,
        ranks: Sequence[int] | None = None,
        **kwargs,
    ) -> dict[int, object]:
        """Start ``method`` on the given ranks (default all); returns rank → object ref, not waited on."""
        ranks = list(range(len(self.actors))) if ranks is None else list(ranks)
        refs = {}
        for i, rank in enumerate(ranks):
            call_args = per_rank_args[i] if per_rank_args is not None else args
            refs[rank] = self.actors[rank].call.remote(method, *call_args, **kwargs)
        return refs

    def call(
        self,
        method: str,
        *args,
        per_rank_args: Sequence[tuple] | None = None,
        ranks: Sequence[int] | None = None,
        timeout_s: float | None = None,
        poll: Callable[[], None] | None = None,
        **kwargs,
    ) -> list:
        """Call ``method`` on the given ranks (default all) and return results in rank order, or raise."""
        refs = self.submit(method, *args, per_rank_args=per_rank_args, ranks=ranks, **kwargs)
        results = self.wait(refs, what=method, timeout_s=timeout_s, poll=poll)
        return [results[r] for r in refs]

    def call_each(
        self,
        method: str,
        *args,
        per_rank_args: Sequence[tuple] | None = None,
        ranks: Sequence[int] | None = None,
        timeout_s: float | None = None,
        poll: Callable[[], None] | None = None,
        **kwargs,
    ) -> tuple[dict[int, object], dict[int, BaseException]]:
        """Like ``call`` for independent per-rank work: waits for every rank, returns (results, errors)."""
        refs = self.submit(method, *args, per_rank_args=per_rank_args, ranks=ranks, **kwargs)
        return self._collect(refs, what=method, timeout_s=timeout_s, poll=poll, fail_fast=False)

    def wait(
        self,
        refs: dict[int, object],
        *,
        what: str,
        timeout_s: float | None = None,
        poll: Callable[[], None] | None = None,
    ) -> dict[int, object]:
        """Wait for rank → ref. After the first failure, wait briefly for the others (they may be blocked
        on the failed rank), then raise every failure seen, grouped by message."""
        results, errors = self._collect(refs, what=what, timeout_s=timeout_s, poll=poll, fail_fast=True)
        if errors:
            raise group_errors(errors, self.where)
        return results

    def _collect(self, refs, *, what, timeout_s, poll, fail_fast: bool, grace_s: float = 2.0):
        import ray

        pending = {ref: rank for rank, ref in refs.items()}
        limit = timeout_s or self.timeout_s
        results: dict[int, object] = {}
        errors: dict[int, BaseException] = {}
        deadline = time.monotonic() + limit
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if errors:
                    break
                raise RankTimeout(f"{what}: rank(s) {sorted(pending.values())} did not finish within {limit:g}s")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(0.5, remaining))
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - grouped and re-raised by the caller
                    if fail_fast and not errors:
                        deadline = min(deadline, time.monotonic() + grace_s)
                    errors[rank] = exc
            if poll is not None:
                poll()
        return results, errors

    def dead_ranks(self, ranks: Sequence[int], *, timeout_s: float = 10.0) -> set[int]:
        """Which of ``ranks`` have no live actor (a ping that fails or does not answer)."""
        import ray

        refs = self.submit("where", ranks=ranks)
        dead = set()
        for r, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout_s)
            except Exception:  # noqa: BLE001 - any failure to answer means we cannot use it
                dead.add(r)
        return dead

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove(self.pg)
            finally:
                self.pg = None
