"""The fetch stage: each node fetches only what its ranks read, once, on that node, from the plan's source.

Nodes of a real cluster do not share a disk, so the fetch must run *on* each node, into that node's
cache, before its ranks read. ``NodeFetch.fetch`` starts one of the source's node fetchers
(``CheckpointSource.fetcher_class``: ``workers.sources.hub_fetcher.NodeFetcher`` for the Hub) per
planned node as a zero-CPU actor inside that node's placement-group bundle (bundle index = node index,
so it lands where the node's ranks are), runs its ``fetch`` with the load's deadline, shows per-node
progress (``NodeProgress``, verb "fetched") while polling it, and stops every fetcher afterwards (after
a failure, the fetchers still running are first asked to stop cleanly, so that no download is cut
mid-file, then killed). A fetcher whose process dies (killed, or its node lost: Ray re-places the
bundle if the cluster has room) is started again, up to the load's ``max_restarts`` times per node;
what it had fetched is kept in the node's cache (whole files verified, ranges vouched for by their
manifest), so the new one resumes. A node whose ranks now run on another machine than its files
(``stale``: a rank re-placed after its node was lost) is fetched again there; a node fetched twice on
the same machine adds up both downloads.
Failures come back grouped like the ranks' (``[Rank 0, 1] (node 127.0.0.2): CheckpointError: ...``).

Where a node caches: the ``cache_dir`` option, else ``$MESHLOAD_CACHE_DIR`` as seen on that node, else
huggingface_hub's default there. A ``token`` given to ``load`` reaches the fetchers through Ray's object
store (not as an argument: actor arguments sit in Ray's control store); without one each node uses its
own ``HF_TOKEN`` or stored login. Whole files or byte ranges: ``mode`` (default ``$MESHLOAD_FETCH`` on
the driver, else ``"ranges"``; see ``workers.sources.fetch_types.FetchOptions``). What a fetcher takes from the
driver is the source's ``fetch_settings()`` (the Hub: the driver's endpoint, where the plan's commit
was resolved; offline mode on the driver makes every node fetch nothing).

``FilesInPlace`` is the same interface for a source read in place (a local folder): every rank reads
the files where they are.

Runs on the driver; used by ``orchestrator.api.load`` and ``orchestrator.materialize``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING

from orchestrator.placement import PlacementError
from orchestrator.progress import NodeProgress
from orchestrator.rank_group import RankError, RankGroup, RankTimeout, group_errors, is_actor_death
from planning.plan import LoadPlan

if TYPE_CHECKING:  # imported by a fetching source only: a local load's driver does without numpy
    from workers.sources.fetch_types import FetchOptions, NodeFetchOutcome
    from workers.sources.base import CheckpointSource

log = logging.getLogger("meshload")

POLL_S = 0.5
CALL_TIMEOUT_S = 30.0
CANCEL_GRACE_S = 10.0  # after a failure, how long the other nodes get to stop cleanly before being killed


@dataclass(frozen=True, slots=True)
class NodeFetchReport:
    """What one node fetched (``LoadedModel.fetch_report`` holds one per node)."""

    node: int
    ranks: tuple[int, ...]
    node_ip: str
    cache_dir: str
    files: tuple[str, ...]
    ranged_files: tuple[str, ...]  # of ``files``, those fetched (or found) as byte ranges only
    bytes_needed: int  # planned bytes: whole files' sizes plus ranges
    bytes_fetched: int  # received over the network (0: all from the node's cache)
    seconds: float
    node_id: str = ""  # the Ray node it ran on
    restarts: int = 0  # times its fetcher died and was started again


class FilesInPlace:
    """A source whose files every rank reads where they are (a local folder): nothing to fetch."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = dict(paths)
        self.report: list[NodeFetchReport] = []

    def stale(self, ranks: list[int]) -> list[int]:
        return []

    def fetch(self, nodes: list[int] | None = None) -> None:
        pass

    def paths(self, rank: int) -> dict[str, str]:
        return dict(self._paths)

    def bytes_fetched(self, rank: int) -> int:
        return 0


def _shares(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (equal if all zero); the parts sum to ``total``."""
    if not weights:
        return []
    weights = weights if any(weights) else [1] * len(weights)
    parts = [total * w // sum(weights) for w in weights]
    parts[0] += total - sum(parts)
    return parts


class NodeFetch:
    """The node-local files of a load from a fetching source, per planned node (see module docstring).

    ``source``: the plan's (``workers.sources.source_of``), which gives the node fetcher's class and the
    settings it takes from the driver. ``options``: how nodes fetch (``LoadOptions.fetch_options()``: the
    defaults, ``$MESHLOAD_FETCH``/``$MESHLOAD_FETCH_MAX_GAP``, then the load's own); ``timeout_s`` (each
    ``fetch``) defaults to the group's
    deadline; ``fetcher_cls`` replaces the source's fetcher class (tests inject faults with it)."""

    def __init__(
        self,
        plan: LoadPlan,
        group: RankGroup,
        *,
        source: CheckpointSource,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        progress: bool = True,
        options: FetchOptions | None = None,
        timeout_s: float | None = None,
        fetcher_cls: type | None = None,
    ) -> None:
        from workers.sources.fetch_types import FetchOptions

        if source.fetcher_class() is None:
            raise ValueError(f"NodeFetch: {plan.model.source} is a {plan.model.kind} checkpoint, read in place")
        self.plan = plan
        self.source = source
        self.group = group
        self.options = FetchOptions.from_env() if options is None else options
        self.cache_dir = cache_dir
        self.token = token
        self.progress = progress
        self.timeout_s = timeout_s or group.timeout_s
        self.fetcher_cls = fetcher_cls
        self._nodes: dict[int, NodeFetchReport] = {}
        self._local: dict[int, dict[str, str]] = {}  # node → plan file name → path on that node
        self._plan_ref = None

    @property
    def report(self) -> list[NodeFetchReport]:
        return [self._nodes[n] for n in sorted(self._nodes)]

    def stale(self, ranks: list[int]) -> list[int]:
        """Of ``ranks``, those whose node's files are not (or not yet) on the machine the rank runs on."""
        node_of = self.group.node_of_rank
        return [
            r for r in ranks
            if node_of[r] not in self._nodes or self._nodes[node_of[r]].node_id != self.group.node_ids.get(r)
        ]

    def paths(self, rank: int) -> dict[str, str]:
        return dict(self._local[self.group.node_of_rank[rank]])

    def bytes_fetched(self, rank: int) -> int:
        """The rank's share of its node's download, in proportion to what each of the node's ranks reads."""
        node = self.plan.nodes[self.group.node_of_rank[rank]]
        weights = [self.plan.ranks[r].read_bytes for r in node.ranks]
        shares = _shares(self._nodes[node.node].bytes_fetched, weights)
        return shares[list(node.ranks).index(rank)]

    def fetch(self, nodes: list[int] | None = None) -> None:
        """Run the fetch of ``nodes`` (default all), each on its node; fetchers that die are started again."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        nodes = [n.node for n in self.plan.nodes] if nodes is None else sorted(set(nodes))
        deadline = time.monotonic() + self.timeout_s
        settings = self.source.fetch_settings()  # read on the driver, the same for every node
        remote_cls = ray.remote(_fetcher_class(self.source) if self.fetcher_cls is None else _with_token_box(self.fetcher_cls))
        if self._plan_ref is None:
            self._plan_ref = ray.put(self.plan)
        # The token travels through the object store, inside a list so that Ray hands the fetcher the
        # reference rather than the value: it is in no actor's or task's arguments, nor in Ray's control store.
        token_box = [ray.put(self.token)] if isinstance(self.token, str) else None

        def spawn(node: int):
            return remote_cls.options(
                num_cpus=0,
                max_concurrency=2,  # fetch() and progress() at once
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.group.pg, placement_group_bundle_index=node
                ),
            ).remote(
                self._plan_ref, node, cache_dir=self.cache_dir, options=self.options, **settings,
            )

        fetchers: dict[int, object] = {}
        restarts = dict.fromkeys(nodes, 0)
        bar = NodeProgress(self.plan, enabled=self.progress, verb="fetched")
        try:
            for node in nodes:
                fetchers[node] = spawn(node)
            pending = {fetchers[n].fetch_with.remote(token_box): n for n in nodes}
            outcomes: dict[int, NodeFetchOutcome] = {}
            errors: dict[int, BaseException] = {}
            last_poll = 0.0
            while pending and not errors:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    late = sorted(pending.values())
                    raise RankTimeout(
                        f"fetch: node(s) {late} (ranks {[r for n in late for r in self.plan.nodes[n].ranks]}, on "
                        f"{sorted({self.group.where.get(self.plan.nodes[n].ranks[0], '?') for n in late})}) did not "
                        f"finish downloading within {self.timeout_s:g}s"
                    )
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(POLL_S, remaining))
                for ref in ready:
                    node = pending.pop(ref)
                    try:
                        outcomes[node] = ray.get(ref, timeout=CALL_TIMEOUT_S)
                    except Exception as exc:  # noqa: BLE001 - a death is retried, anything else grouped below
                        if not is_actor_death(exc):
                            errors[node] = exc
                        elif restarts[node] >= self.group.max_restarts:
                            errors[node] = RankError(
                                f"node {node}'s fetcher died {restarts[node] + 1} times; giving up after "
                                f"{self.group.max_restarts} restart(s)"
                            )
                        else:
                            restarts[node] += 1
                            log.warning(
                                "meshload: node %d's fetcher (%s) died; starting it again (%d of %d)",
                                node, self._where(node), restarts[node], self.group.max_restarts,
                            )
                            fetchers[node] = self._respawn(spawn, node)
                            pending[fetchers[node].fetch_with.remote(token_box)] = node
                if time.monotonic() - last_poll >= POLL_S:
                    last_poll = time.monotonic()
                    self._poll(fetchers, outcomes, bar)
            if errors:
                self._stop(pending, fetchers)
                by_rank = {r: exc for node, exc in errors.items() for r in self.plan.nodes[node].ranks}
                raise group_errors(by_rank, self.group.where, phase="fetch", who="the node's fetcher")
            self._poll(fetchers, outcomes, bar)
        finally:
            bar.close()
            for actor in fetchers.values():
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone is fine
                    pass
        for node, outcome in outcomes.items():
            self._record(outcome, restarts[node])

    def _respawn(self, spawn, node: int):
        """A new fetcher for ``node``, once it runs. Its node may be gone: Ray re-places the bundle if the
        cluster has room (a fetcher placed on the lost node meanwhile dies at once, and is replaced);
        if it has none, a ``PlacementError`` after ``placement_timeout_s``."""
        import ray

        timeout_s = self.group.placement_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            placed_on = self.group.bundle_node(node)
            fetcher = spawn(node)
            try:
                ray.get(fetcher.where.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return fetcher
            except ray.exceptions.GetTimeoutError:
                pass
            except Exception:  # noqa: BLE001 - it died at once
                if self.group.died_by_itself(node, placed_on):
                    return fetcher  # its fetch call says so, and counts as a death
            ray.kill(fetcher, no_restart=True)
            if time.monotonic() >= deadline:
                raise PlacementError(
                    f"node {node}'s fetcher (was on {self._where(node)}) could not be started again within "
                    f"{timeout_s:g}s: its node is gone and the cluster has no room to re-place it"
                )
            time.sleep(1.0)

    def _where(self, node: int) -> str:
        return self.group.where.get(self.plan.nodes[node].ranks[0], "not yet placed")

    def _record(self, outcome: NodeFetchOutcome, restarts: int) -> None:
        """Book a node's fetch; on the machine it had already fetched on, both downloads add up (what a
        lost machine had downloaded went with it)."""
        node = self.plan.nodes[outcome.node]
        report = NodeFetchReport(
            node=node.node,
            ranks=tuple(node.ranks),
            node_ip=outcome.node_ip,
            cache_dir=outcome.cache_dir,
            files=tuple(f.file for f in outcome.files),
            ranged_files=tuple(f.file for f in outcome.files if not f.whole),
            bytes_needed=sum(f.bytes_needed for f in outcome.files),
            bytes_fetched=outcome.bytes_fetched,
            seconds=outcome.seconds,
            node_id=outcome.node_id,
            restarts=restarts,
        )
        before = self._nodes.get(node.node)
        if before is not None and before.node_id == report.node_id:
            report = replace(
                report, bytes_fetched=before.bytes_fetched + report.bytes_fetched, seconds=before.seconds + report.seconds,
                restarts=before.restarts + report.restarts,
            )
        self._nodes[node.node] = report
        self._local[node.node] = {f.file: f.path for f in outcome.files}

    def _stop(self, pending: dict, fetchers: dict[int, object]) -> None:
        """Ask the fetches still running to stop, and give them a moment to do so cleanly (then they are killed)."""
        import ray

        if not pending:
            return
        for node in pending.values():
            try:
                fetchers[node].cancel.remote()
            except Exception:  # noqa: BLE001 - best effort; the actor is killed next anyway
                pass
        ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_GRACE_S)

    def _poll(self, fetchers: dict[int, object], outcomes: dict[int, NodeFetchOutcome], bar: NodeProgress) -> None:
        """Feed the per-node bar: a node's (done, total) is booked on its first rank."""
        import ray

        if not bar.enabled:
            return
        live = [(n, f) for n, f in fetchers.items() if n not in outcomes]
        states = {}
        if live:
            try:
                states = dict(zip((n for n, _ in live), ray.get([f.progress.remote() for _, f in live], timeout=CALL_TIMEOUT_S)))
            except Exception:  # noqa: BLE001 - progress is best effort; the fetch wait reports real failures
                states = {}
        for node, outcome in outcomes.items():
            needed = sum(f.bytes_needed for f in outcome.files)
            states[node] = (needed, needed)
        bar.update({self.plan.nodes[n].ranks[0]: s for n, s in states.items()})


def _fetcher_class(source: CheckpointSource) -> type:
    """The fetcher actor's class: the source's node fetcher taking its token from the object store (``_with_token_box``)."""
    return _with_token_box(source.fetcher_class())


@cache
def _with_token_box(base: type) -> type:
    """``base`` (a source's node fetcher, or a subclass) with ``fetch_with(token_box)``: the token, if any, taken from the
    object store on the node."""

    class NodeFetcherActor(base):
        def fetch_with(self, token_box: list | None):
            import ray

            token = ray.get(token_box[0], timeout=CALL_TIMEOUT_S) if token_box else None
            return self.fetch(token=token)

    NodeFetcherActor.__name__ = NodeFetcherActor.__qualname__ = base.__name__
    return NodeFetcherActor
