"""The fetch stage of a Hub load: each node downloads only what its ranks read, once, on that node.

Nodes of a real cluster do not share a disk, so the fetch must run *on* each node, into that node's
cache, before its ranks read. For every planned node this starts one ``workers.fetcher.NodeFetcher``
as a zero-CPU actor inside that node's placement-group bundle (bundle index = node index, so it lands
where the node's ranks already are), runs its ``fetch`` with the load's deadline, shows per-node
progress (``NodeProgress``, verb "fetched") while polling it, and stops every fetcher afterwards (after
a failure, the fetchers still running are first asked to stop cleanly, so that no download is cut
mid-file, then killed).
Failures come back grouped like the ranks' (``[Rank 0, 1] (node 127.0.0.2): CheckpointError: ...``).

Where a node caches: the ``cache_dir`` option, else ``$MESHLOAD_CACHE_DIR`` as seen on that node, else
huggingface_hub's default there. A ``token`` given to ``load`` reaches the fetchers through Ray's object
store (not as an argument: actor arguments sit in Ray's control store); without one each node uses its
own ``HF_TOKEN`` or stored login. Whole files or byte ranges: ``mode`` (default ``$MESHLOAD_FETCH`` on
the driver, else ``"ranges"``; see ``workers.fetcher.FetchOptions``). The Hub endpoint is the driver's
(the plan's commit was resolved there); offline mode on the driver makes every node fetch nothing.

Runs on the driver; called by ``orchestrator.api.load`` for ``plan.model.kind == "hub"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING

from orchestrator.progress import NodeProgress
from orchestrator.rank_group import RankGroup, RankTimeout, group_errors
from planning.errors import MeshloadError
from planning.hub_index import hub_endpoint, hub_offline
from planning.plan import LoadPlan

if TYPE_CHECKING:  # imported by a Hub fetch only: a local load's driver does without numpy
    from workers.fetcher import NodeFetchOutcome

POLL_S = 0.5
CALL_TIMEOUT_S = 30.0
CANCEL_GRACE_S = 10.0  # after a failure, how long the other nodes get to stop cleanly before being killed


class FetchPlacementError(MeshloadError, RuntimeError):
    """A node's fetcher did not run on the node that hosts its ranks."""


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


@dataclass(frozen=True)
class FetchResult:
    paths: list[dict[str, str]]  # per rank: plan file name → local path on that rank's node
    bytes_fetched: list[int]  # per rank: its share of its node's download
    nodes: list[NodeFetchReport]


def merge_refetch(before: FetchResult, after: FetchResult, node_of_rank: list[int]) -> FetchResult:
    """The fetch run again after ranks were re-placed: a node still on the same machine adds up both of
    its downloads (and so do its ranks' shares); a node now on another machine has only the new one
    (what the lost machine had downloaded went with it)."""
    old = {n.node: n for n in before.nodes}
    nodes, same = [], set()
    for n in after.nodes:
        o = old.get(n.node)
        if o is not None and o.node_ip == n.node_ip:
            n = replace(n, bytes_fetched=o.bytes_fetched + n.bytes_fetched, seconds=o.seconds + n.seconds)
            same.add(n.node)
        nodes.append(n)
    fetched = [a + (b if node_of_rank[r] in same else 0) for r, (b, a) in enumerate(zip(before.bytes_fetched, after.bytes_fetched))]
    return FetchResult(paths=after.paths, bytes_fetched=fetched, nodes=nodes)


def _shares(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (equal if all zero); the parts sum to ``total``."""
    if not weights:
        return []
    weights = weights if any(weights) else [1] * len(weights)
    parts = [total * w // sum(weights) for w in weights]
    parts[0] += total - sum(parts)
    return parts


def fetch_for_ranks(
    plan: LoadPlan,
    group: RankGroup,
    *,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
    mode: str | None = None,
    max_gap_bytes: int | None = None,
    timeout_s: float | None = None,
) -> FetchResult:
    """Run one fetch per node, on that node (see module docstring); returns paths and costs per rank.

    ``mode``/``max_gap_bytes`` override ``$MESHLOAD_FETCH``/``$MESHLOAD_FETCH_MAX_GAP``; ``timeout_s``
    defaults to the group's deadline.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from workers.fetcher import FetchOptions

    if plan.model.kind != "hub":
        raise ValueError(f"fetch_for_ranks: {plan.model.source} is a {plan.model.kind} checkpoint, not a Hub one")
    options = FetchOptions.from_env(mode=mode, max_gap_bytes=max_gap_bytes)
    deadline = time.monotonic() + (timeout_s or group.timeout_s)
    endpoint, offline = hub_endpoint(), hub_offline()
    remote_cls = ray.remote(_fetcher_class())
    plan_ref = ray.put(plan)
    fetchers = []
    bar = NodeProgress(plan, enabled=progress, verb="fetched")
    try:
        for node in plan.nodes:
            fetchers.append(
                remote_cls.options(
                    num_cpus=0,
                    max_concurrency=2,  # fetch() and progress() at once
                    max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=group.pg, placement_group_bundle_index=node.node
                    ),
                ).remote(
                    plan_ref, node.node, cache_dir=cache_dir, endpoint=endpoint,
                    offline=True if offline else None,  # offline on the driver: on every node; else the node's own flag
                    options=options,
                )
            )
        # The token travels through the object store, inside a list so that Ray hands the fetcher the
        # reference rather than the value: it is in no actor's or task's arguments, nor in Ray's control store.
        token_box = [ray.put(token)] if isinstance(token, str) else None
        outcomes = _wait_all(plan, group, fetchers, bar, deadline, token_box=token_box)
    finally:
        bar.close()
        for actor in fetchers:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
    return _result(plan, group, outcomes)


@cache
def _fetcher_class() -> type:
    """``NodeFetcher`` with ``fetch_with(token_box)``: the token, if any, taken from the object store on the node."""
    from workers.fetcher import NodeFetcher

    class NodeFetcherActor(NodeFetcher):
        def fetch_with(self, token_box: list | None):
            import ray

            token = ray.get(token_box[0], timeout=CALL_TIMEOUT_S) if token_box else None
            return self.fetch(token=token)

    NodeFetcherActor.__name__ = NodeFetcherActor.__qualname__ = "NodeFetcher"
    return NodeFetcherActor


def _wait_all(
    plan: LoadPlan, group: RankGroup, fetchers: list, bar: NodeProgress, deadline: float, *, token_box: list | None,
) -> dict[int, NodeFetchOutcome]:
    import ray

    pending = {f.fetch_with.remote(token_box): node.node for f, node in zip(fetchers, plan.nodes)}
    outcomes: dict[int, NodeFetchOutcome] = {}
    errors: dict[int, BaseException] = {}
    last_poll = 0.0
    while pending and not errors:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            nodes = sorted(pending.values())
            raise RankTimeout(
                f"fetch: node(s) {nodes} (ranks {[r for n in nodes for r in plan.nodes[n].ranks]}) did not finish "
                f"downloading within the deadline"
            )
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(POLL_S, remaining))
        for ref in ready:
            node = pending.pop(ref)
            try:
                outcomes[node] = ray.get(ref, timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - grouped below
                errors[node] = exc
        if time.monotonic() - last_poll >= POLL_S:
            last_poll = time.monotonic()
            _poll(plan, fetchers, outcomes, bar)
    if errors:
        _stop(pending, fetchers, plan)
        by_rank = {r: exc for node, exc in errors.items() for r in plan.nodes[node].ranks}
        raise group_errors(by_rank, group.where)
    _poll(plan, fetchers, outcomes, bar)
    return outcomes


def _stop(pending: dict, fetchers: list, plan: LoadPlan) -> None:
    """Ask the fetches still running to stop, and give them a moment to do so cleanly (then they are killed)."""
    import ray

    if not pending:
        return
    for node in pending.values():
        try:
            fetchers[[n.node for n in plan.nodes].index(node)].cancel.remote()
        except Exception:  # noqa: BLE001 - best effort; the actor is killed next anyway
            pass
    ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_GRACE_S)


def _poll(plan: LoadPlan, fetchers: list, outcomes: dict[int, NodeFetchOutcome], bar: NodeProgress) -> None:
    """Feed the per-node bar: a node's (done, total) is booked on its first rank."""
    import ray

    if not bar.enabled:
        return
    live = [(n, f) for n, f in zip(plan.nodes, fetchers) if n.node not in outcomes]
    states = {}
    if live:
        try:
            states = dict(zip((n.node for n, _ in live), ray.get([f.progress.remote() for _, f in live], timeout=CALL_TIMEOUT_S)))
        except Exception:  # noqa: BLE001 - progress is best effort; the fetch wait reports real failures
            states = {}
    for node, outcome in outcomes.items():
        needed = sum(f.bytes_needed for f in outcome.files)
        states[node] = (needed, needed)
    bar.update({plan.nodes[n].ranks[0]: s for n, s in states.items()})


def _result(plan: LoadPlan, group: RankGroup, outcomes: dict[int, NodeFetchOutcome]) -> FetchResult:
    paths: list[dict[str, str]] = [{} for _ in plan.ranks]
    fetched = [0] * plan.world_size
    reports = []
    for node in plan.nodes:
        outcome = outcomes[node.node]
        rank_nodes = {group.node_ids.get(r) for r in node.ranks} - {None, ""}
        if outcome.node_id and rank_nodes and rank_nodes != {outcome.node_id}:
            raise FetchPlacementError(
                f"node {node.node}: the fetch ran on Ray node {outcome.node_id} but its ranks {list(node.ranks)} "
                f"run on {sorted(rank_nodes)}; their files would not be local"
            )
        local = {f.file: f.path for f in outcome.files}
        weights = [plan.ranks[r].read_bytes for r in node.ranks]
        for r, share in zip(node.ranks, _shares(outcome.bytes_fetched, weights)):
            paths[r] = dict(local)
            fetched[r] = share
        reports.append(
            NodeFetchReport(
                node=node.node,
                ranks=tuple(node.ranks),
                node_ip=outcome.node_ip,
                cache_dir=outcome.cache_dir,
                files=tuple(f.file for f in outcome.files),
                ranged_files=tuple(f.file for f in outcome.files if not f.whole),
                bytes_needed=sum(f.bytes_needed for f in outcome.files),
                bytes_fetched=outcome.bytes_fetched,
                seconds=outcome.seconds,
            )
        )
    return FetchResult(paths=paths, bytes_fetched=fetched, nodes=reports)
