"""The rank actors of one load: start them in the placement group, call them, restart them, stop them.

The worker class is a plain class (``workers.rank_worker.RankWorker``); here it runs in a Ray actor
(threaded, so the driver can poll progress while a load runs) hosted by ``workers.rank_host``, so the
driver starts ranks without importing torch; its methods are called by name. Every call to the ranks
waits with a deadline. ``call`` raises on failure, grouped by message and naming each rank's node and
the phase — ``[Rank 0, 1] (node 10.0.0.2): CheckpointError: ... [during read]`` — keeping the type of
a user error raised on a rank (a truncated file, say). ``call_each`` instead returns what succeeded
and what failed, so that ``settle`` can restart the ranks whose actor died (its process was killed,
or its node was lost: Ray re-places the node's bundle if the cluster has room) and the step go on.

A rank's node is known from the moment its placement bundle is (the placement group's bundle → node
table), before the rank answers, so no error has to say "node ?". Restarts are bounded per rank by
``max_restarts``; a restarted rank comes back at the level the group has reached: started, and
holding the plan (given to its constructor) once the plan is attached.

``shutdown`` kills every actor and removes the placement group; it is idempotent and runs on every
exit path of ``orchestrator.load``.

Runs on the driver.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from orchestrator.placement import PlacementError, bundles_for, create_placement_group, remove
from planning.errors import MeshloadError
from planning.plan import LoadPlan
from workers.rank_host import host_class

log = logging.getLogger("meshload")

# The phase of a load (or of inference) each worker method belongs to, as errors name it.
PHASE_OF_METHOD = {
    "where": "start",
    "attach": "attach",
    "check_kernels": "attach",
    "get_progress": "read",
    "load": "read",
    "tied_for": "tie exchange",
    "receive_tied": "tie exchange",
    "finalize": "finalize",
    "local_state": "state gather",
    "pick_port": "process group",
    "init_inference": "process group",
    "close": "process group",
    "forward_step": "inference",
    "run": "run",
    "decode": "inference",
    "decode_quietly": "inference",
    "stop_decoding": "inference",
    "reload": "update weights",
}


class RankError(MeshloadError, RuntimeError):
    """One or more ranks failed; the message groups ranks by error."""


class RankTimeout(MeshloadError, TimeoutError):
    """Ranks did not finish a step within its deadline."""


def is_actor_death(exc: BaseException) -> bool:
    """Ray says an actor is gone. Note that a call whose *argument* came from a dead actor fails with
    such an error too (``RayTaskError(ActorDiedError)``) while its own actor lives: ``RankGroup.settle``
    asks the ranks themselves before restarting any."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, RayActorError, ActorUnavailableError)) and not init_failed(exc)


def init_failed(exc: BaseException) -> bool:
    """The actor's constructor raised: an error of its own, not a death that a restart would cure."""
    return bool(getattr(exc, "actor_init_failed", False))


def _describe(exc: BaseException, *, who: str) -> tuple[type[BaseException], str]:
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if cause is not None and not is_actor_death(cause):
            return type(cause), f"{type(cause).__name__}: {cause}"
        if cause is None:
            return RankError, str(exc).strip().splitlines()[-1]
        # an argument of the call came from an actor that died, not the rank itself
        return RankError, f"an actor whose output it was waiting for died ({str(cause).strip().splitlines()[0]})"
    if is_actor_death(exc):
        return RankError, f"{who} died ({str(exc).strip().splitlines()[0]})"
    return type(exc), f"{type(exc).__name__}: {exc}"


def group_errors(
    errors: dict[int, BaseException], where: dict[int, str], *, phase: str, who: str = "the rank's process"
) -> BaseException:
    """One exception for many ranks: ``[Rank 0, 1] (node ...): message [during phase]`` lines, typed when
    they agree. ``who`` names what died when an actor did (a rank's process, a node's fetcher)."""
    by_message: dict[str, list[int]] = {}
    types = set()
    for rank in sorted(errors):
        exc_type, message = _describe(errors[rank], who=who)
        types.add(exc_type)
        by_message.setdefault(message, []).append(rank)
    lines = []
    for message, ranks in by_message.items():
        nodes = sorted({where.get(r, "not yet placed") for r in ranks})
        lines.append(f"[Rank {', '.join(map(str, ranks))}] (node {', '.join(nodes)}): {message} [during {phase}]")
    text = "\n".join(lines)
    (only,) = types if len(types) == 1 else (None,)
    if only is not None and issubclass(only, MeshloadError) and only is not RankError:
        try:
            return only(text)
        except TypeError:
            pass
    return RankError(text)


def node_addresses() -> dict[str, str]:
    """Ray node id → the node's IP, for every node the cluster has known (dead ones too)."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}


class RankGroup:
    """The actors of one load, one per rank; rank ``r`` runs on node ``node_of_rank[r]`` (the plan's blocks).

    The actors can start before the plan exists (``start()`` without one, then ``attach(plan)``), so
    their process start and imports overlap the driver's planning. A rank whose actor dies is restarted
    at most ``max_restarts`` times while ``budget`` counts (``reset_budget`` starts a new count, as each
    inference call does); ``restarts`` counts every restart, for the reports."""

    def __init__(self, node_of_rank: Sequence[int], *, timeout_s: float, max_restarts: int = 2) -> None:
        self.node_of_rank = list(node_of_rank)
        self.timeout_s = timeout_s
        self.max_restarts = max_restarts
        self.actors: list = []
        self.pg = None
        self.where: dict[int, str] = {}  # rank → its node's IP, from placement on
        self.node_ids: dict[int, str] = {}  # rank → Ray node id
        self.preloaded: dict[int, bool] = {}  # rank → its process had transformers imported (workers.preload)
        self.restarts: dict[int, int] = dict.fromkeys(range(len(self.node_of_rank)), 0)
        self.budget: dict[int, int] = dict.fromkeys(range(len(self.node_of_rank)), 0)
        self._spawn: Callable[[int], object] | None = None
        self._plan_ref = None  # the plan in the object store, once attached: restarted ranks get it at once
        self.placement_timeout_s = 60.0

    @property
    def ranks(self) -> list[int]:
        return list(range(len(self.node_of_rank)))

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
        gives it later); returns once every actor answers (ranks that died meanwhile restarted).
        ``poll()`` is called while waiting (it may raise, e.g. when planning failed meanwhile)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if plan is not None:
            self._plan_ref = ray.put(plan)
        self.placement_timeout_s = placement_timeout_s
        num_nodes = max(self.node_of_rank) + 1
        bundles = bundles_for(self.node_of_rank, num_nodes, cpus_per_rank=cpus_per_rank, gpus_per_rank=gpus_per_rank)
        self.pg = create_placement_group(bundles, timeout_s=placement_timeout_s, name="", poll=poll)
        self._record_bundles()
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
        self.actors = [spawn(r) for r in self.ranks]
        results, errors = self.call_each("where", timeout_s=placement_timeout_s + 120, poll=poll)
        for rank, info in results.items():
            self._record(rank, info)
        if errors:
            self.settle(errors, phase="start")
        if plan is not None:
            _, errors = self.call_each("check_kernels")
            if errors:
                self.settle(errors, phase="attach")
        return self

    @property
    def attached(self) -> bool:
        """Whether the ranks have their plan (given at start, or by ``attach``)."""
        return self._plan_ref is not None

    def attach(self, plan: LoadPlan) -> None:
        """Hand the plan to the ranks (each checks its node can run it); ranks that died meanwhile are
        restarted, and get it as they start."""
        import ray

        self._plan_ref = ray.put(plan)
        results, errors = self.call_each("attach", self._plan_ref)
        if errors:
            self.settle(errors, phase="attach")

    def replan(self, plan: LoadPlan) -> None:
        """The plan ranks restarted from now on are given (``update_weights``: the new checkpoint's)."""
        import ray

        self._plan_ref = ray.put(plan)

    @property
    def plan_ref(self):
        """The attached plan in the object store (None before ``attach``)."""
        return self._plan_ref

    def _record_bundles(self) -> None:
        """Where each rank's bundle is, as soon as the placement group is: errors name the node even for a
        rank that never answered."""
        import ray

        table = ray.util.placement_group_table(self.pg).get("bundles_to_node_id", {})
        addresses = node_addresses()
        for rank, bundle in enumerate(self.node_of_rank):
            node_id = table.get(bundle)
            if node_id:
                self.node_ids[rank] = node_id
                self.where[rank] = addresses.get(node_id, f"id {node_id[:12]}")

    def _record(self, rank: int, info: dict) -> None:
        self.where[rank] = f"{info['node_ip'] or info['host']}"
        self.node_ids[rank] = info["node_id"]
        self.preloaded[rank] = bool(info.get("preloaded"))

    # -- deaths ----------------------------------------------------------------------------------
    def settle(self, errors: dict[int, BaseException], *, phase: str, suspects: Sequence[int] = ()) -> set[int]:
        """After a step that failed on the ranks of ``errors``: restart those whose actor is gone (they and
        ``suspects`` are asked; a failure to answer counts as gone) and return them. When none is gone,
        the errors are the step's own: raise them, grouped."""
        failed_init = {r: e for r, e in errors.items() if init_failed(e)}
        if failed_init:
            raise group_errors(failed_init, self.where, phase=phase)
        dead = self.dead_ranks(sorted(set(errors) | set(suspects)))
        if not dead:
            raise group_errors(errors, self.where, phase=phase)
        self.revive(dead, phase=phase, causes=errors)
        return dead

    def revive(self, ranks: Sequence[int], *, phase: str, causes: dict[int, BaseException] | None = None) -> None:
        """Restart ``ranks`` (their actors died during ``phase``), each within its restart budget."""
        for rank in sorted(ranks):
            self._restart(rank, phase=phase, cause=(causes or {}).get(rank))

    def reset_budget(self) -> None:
        self.budget = dict.fromkeys(self.ranks, 0)

    def _spend(self, rank: int, *, phase: str, cause: BaseException | None) -> None:
        """Count one death of ``rank``; past the budget, give up naming the rank, its node and the phase."""
        if self.budget[rank] >= self.max_restarts:
            raise RankError(
                f"rank {rank} (node {self.where.get(rank, 'not yet placed')}) died {self.budget[rank] + 1} times "
                f"during {phase}; giving up after {self.max_restarts} restart(s)"
            ) from cause
        self.budget[rank] += 1
        self.restarts[rank] += 1
        log.warning(
            "meshload: rank %d (node %s) died during %s; restarting it (%d of %d)",
            rank, self.where.get(rank, "not yet placed"), phase, self.budget[rank], self.max_restarts,
        )

    def _restart(self, rank: int, *, phase: str, cause: BaseException | None) -> None:
        """Replace ``rank``'s actor by a fresh one in the same bundle (Ray re-places the bundle if its node
        was lost), holding the plan if the group has one.

        Right after a node is lost Ray may still place the new actor on it (Ray notices a lost node only
        after its health checks fail); such an actor dies once Ray does, so we try again until one answers
        or ``placement_timeout_s`` has passed. A new actor that dies where its bundle still is, on a live
        node, died by itself: that is one more death, within the budget."""
        import ray

        self._spend(rank, phase=phase, cause=cause)
        old = self.where.get(rank, "not yet placed")
        deadline = time.monotonic() + self.placement_timeout_s
        bundle = self.node_of_rank[rank]
        while True:
            try:
                ray.kill(self.actors[rank], no_restart=True)
            except Exception:  # noqa: BLE001 - it is already dead
                pass
            placed_on = self.bundle_node(bundle)
            self.actors[rank] = self._spawn(rank)
            step = "start"
            try:
                info = self.call("where", ranks=[rank], timeout_s=max(deadline - time.monotonic(), 1.0))[0]
                self._record(rank, info)
                if self._plan_ref is not None:  # the plan came with the constructor: can this node run it?
                    step = "attach"
                    self.call("check_kernels", ranks=[rank])
                return
            except RankTimeout:
                raise PlacementError(
                    f"rank {rank} (was on node {old}) could not be restarted within {self.placement_timeout_s:g}s: "
                    f"its node is gone and the cluster has no room to re-place it"
                ) from None
            except RankError as exc:
                if not self.dead_ranks([rank]):
                    raise  # the new actor lives: the error is its own (e.g. its node cannot run the plan)
                if time.monotonic() >= deadline:
                    raise
                if self.died_by_itself(bundle, placed_on):
                    self._spend(rank, phase=step, cause=exc)
                else:
                    time.sleep(1.0)

    def bundle_node(self, bundle: int) -> str | None:
        """The Ray node id placement bundle ``bundle`` is on now (None while it is being re-placed)."""
        import ray

        return ray.util.placement_group_table(self.pg).get("bundles_to_node_id", {}).get(bundle)

    def died_by_itself(self, bundle: int, placed_on: str | None) -> bool:
        """An actor started in ``bundle`` while it was on node ``placed_on`` died: by itself if the bundle is
        still there and that node lives; not if the node was lost (Ray has re-placed the bundle, or
        marked the node dead)."""
        import ray

        return (
            placed_on is not None
            and self.bundle_node(bundle) == placed_on
            and any(n["NodeID"] == placed_on and n["Alive"] for n in ray.nodes())
        )

    def dead_ranks(self, ranks: Sequence[int], *, timeout_s: float = 10.0) -> set[int]:
        """Which of ``ranks`` have no live actor (a ping that fails or does not answer within ``timeout_s``)."""
        import ray

        refs = self.submit("where", ranks=ranks)
        dead = set()
        deadline = time.monotonic() + timeout_s
        for r, ref in refs.items():
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - any failure to answer means we cannot use it
                dead.add(r)
        return dead

    # -- calls -----------------------------------------------------------------------------------
    def submit(
        self,
        method: str,
        *args,
        per_rank_args: Sequence[tuple] | None = None,
        ranks: Sequence[int] | None = None,
        **kwargs,
    ) -> dict[int, object]:
        """Start ``method`` on the given ranks (default all); returns rank → object ref, not waited on."""
        ranks = self.ranks if ranks is None else list(ranks)
        refs = {}
        for i, rank in enumerate(ranks):
            call_args = per_rank_args[i] if per_rank_args is not None else args
            refs[rank] = self.actors[rank].call.remote(method, *call_args, **kwargs)
        return refs

    def stream(self, method: str, rank: int, *args, **kwargs):
        """Start generator method ``method`` on ``rank`` as a Ray streaming call; read it with ``next_streamed``."""
        return self.actors[rank].call_stream.options(num_returns="streaming").remote(method, *args, **kwargs)

    def next_streamed(self, stream, *, rank: int, watch: dict[int, object], what: str, timeout_s: float | None = None):
        """The next item ``rank``'s streaming call yields (``StopIteration`` once it has ended), waiting at most
        ``timeout_s``. Calls in ``watch`` (rank → ref) that fail meanwhile fail this wait at once; their
        errors and the stream's are raised grouped, as ``wait`` raises them."""
        import ray

        limit = timeout_s or self.timeout_s
        deadline = time.monotonic() + limit
        phase = PHASE_OF_METHOD.get(what, what)
        while True:
            ready, _ = ray.wait([stream], timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            if ready:
                try:
                    return ray.get(next(stream))
                except StopIteration:
                    raise
                except Exception as exc:  # noqa: BLE001 - grouped below
                    raise group_errors({rank: exc}, self.where, phase=phase) from None
            finished, _ = ray.wait(list(watch.values()), num_returns=len(watch), timeout=0) if watch else ([], [])
            errors = {}
            for r, ref in watch.items():
                if ref in finished:
                    try:
                        ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - grouped below
                        errors[r] = exc
            if errors:
                raise group_errors(errors, self.where, phase=phase)
            if time.monotonic() >= deadline:
                nodes = self.where.get(rank, "not yet placed")
                raise RankTimeout(f"{what}: rank {rank} (node {nodes}) yielded nothing within {limit:g}s [during {phase}]")

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
            raise group_errors(errors, self.where, phase=PHASE_OF_METHOD.get(what, what))
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
                ranks = sorted(pending.values())
                nodes = sorted({self.where.get(r, "not yet placed") for r in ranks})
                late = f"{what}: rank(s) {ranks} (node {', '.join(nodes)}) did not finish within {limit:g}s"
                if not errors:
                    raise RankTimeout(f"{late} [during {PHASE_OF_METHOD.get(what, what)}]")
                if not fail_fast:  # independent work: a rank that did not finish failed too
                    errors.update(dict.fromkeys(ranks, RankTimeout(late)))
                break  # after a failure, the others were likely blocked on the failed rank
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
