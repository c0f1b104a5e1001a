"""Bring every rank to "ready": read its ranges, receive its tied tensors, build its model — surviving deaths.

Each rank goes ``new → loaded → tied → ready`` (``tied`` only for ranks that receive a tensor from
another stage). The steps are per rank and idempotent, so when a rank's actor dies — its process was
killed, or its node was lost — the rank is restarted in the same placement bundle (Ray re-places the
bundle on another node if the old one is gone and the cluster has room) and redoes its steps, while
the other ranks keep what they have done. Ranks waiting for a tensor from a restarted sender simply
receive it again. Restarts are bounded per rank; past the bound, or for any error that is not a
death (a truncated file, a bad plan), the load fails with the ranks and nodes named.

Runs on the driver, inside ``orchestrator.load``.
"""

from __future__ import annotations

import logging

from orchestrator.progress import NodeProgress
from orchestrator.rank_group import RankError, RankGroup, group_errors, is_actor_death
from planning.plan import LoadPlan
from workers.report import RankReport

log = logging.getLogger("meshload")


def _throttled(fn, every_s: float):
    import time

    last = [0.0]

    def call() -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            fn()

    return call


def materialize(
    plan: LoadPlan,
    group: RankGroup,
    paths: list[dict[str, str]],
    fetched: list[int],
    *,
    progress: bool,
    max_restarts: int,
    refetch=None,
) -> list[RankReport]:
    """Run load / ties / finalize on every rank with bounded restarts; returns the reports in rank order.

    ``refetch()`` (Hub loads) fetches again and returns new ``(paths, fetched)``: a rank re-placed on
    another node must read from that node's cache, which the fetch fills first."""
    import ray

    ranks = [r.rank for r in plan.ranks]
    state = {r: "new" for r in ranks}
    reports: dict[int, RankReport] = {}
    senders_of: dict[int, list[int]] = {}
    for r in plan.ranks:
        for s in r.sends:
            senders_of.setdefault(s.to_rank, []).append(r.rank)
    bar = NodeProgress(plan, enabled=progress)
    done_bytes: dict[int, tuple[int, int]] = {}

    def poll(of: list[int] | None = None) -> None:
        """Update the bar from the given ranks (once they have finished), else from every rank still loading."""
        targets = of if of is not None else [r for r in ranks if state[r] == "new"]
        refs = group.submit("get_progress", ranks=targets)
        for r, ref in refs.items():
            try:
                done_bytes[r] = ray.get(ref, timeout=10)
            except Exception:  # noqa: BLE001 - a rank being restarted has no progress to show
                pass
        bar.update(done_bytes)

    def recover(errors: dict[int, BaseException], step: str) -> None:
        """Restart dead ranks (bounded); raise for anything else."""
        suspects = sorted(set(errors) | {s for r in errors for s in senders_of.get(r, [])})
        dead = {r for r in errors if is_actor_death(errors[r])} | group.dead_ranks(suspects)
        if not dead:
            raise group_errors(errors, group.where)
        moved = False
        for r in sorted(dead):
            if group.restarts[r] >= max_restarts:
                raise RankError(
                    f"rank {r} (node {group.where.get(r, '?')}) died {group.restarts[r] + 1} times during {step}; "
                    f"giving up after {max_restarts} restart(s)"
                ) from errors.get(r)
            log.warning("meshload: rank %d (node %s) died during %s; restarting it", r, group.where.get(r, "?"), step)
            before = group.node_ids.get(r)
            group.restart(r)
            moved |= group.node_ids.get(r) != before
            state[r] = "new"
            done_bytes.pop(r, None)
        if moved and refetch is not None:
            new_paths, new_fetched = refetch()
            paths[:] = new_paths
            fetched[:] = new_fetched
        for r in ranks:  # receivers not yet ready take their tied tensors again from restarted senders
            if state[r] == "tied" and any(s in dead for s in senders_of.get(r, [])):
                state[r] = "loaded"

    try:
        while True:
            todo = [r for r in ranks if state[r] == "new"]
            if todo:
                results, errors = group.call_each(
                    "load", per_rank_args=[(paths[r], fetched[r]) for r in todo], ranks=todo, poll=_throttled(poll, 0.5)
                )
                poll(of=list(results))  # the final figures of the ranks that finished
                for r in results:
                    state[r] = "loaded"
                if errors:
                    recover(errors, "load")
                    continue
            receivers = [r for r in ranks if state[r] == "loaded" and r in senders_of]
            if receivers:
                refs = {}
                for to in receivers:
                    refs[to] = tuple(group.submit("tied_for", to, ranks=sorted(set(senders_of[to]))).values())
                # Object refs as top-level arguments: Ray moves each tensor node to node, not via the driver.
                results, errors = group.call_each(
                    "receive_tied", per_rank_args=[refs[to] for to in receivers], ranks=receivers
                )
                for r in results:
                    state[r] = "tied"
                if errors:
                    recover(errors, "tie exchange")
                    continue
            todo = [r for r in ranks if state[r] in ("loaded", "tied") and (state[r] == "tied" or r not in senders_of)]
            results, errors = group.call_each("finalize", ranks=todo)
            for r, report in results.items():
                state[r] = "ready"
                reports[r] = report
            if errors:
                recover(errors, "finalize")
                continue
            if all(s == "ready" for s in state.values()):
                break
    finally:
        bar.close()
    return [reports[r] for r in ranks]
