"""Bring ranks to "ready": read their ranges, receive their tied tensors, build their models — surviving deaths.

Each rank goes ``new → loaded → tied → ready`` (``tied`` only for ranks that receive a tensor from
another stage). The steps are per rank and idempotent, so when a rank's actor dies — its process was
killed, or its node was lost — the rank is restarted in the same placement bundle (Ray re-places the
bundle on another node if the old one is gone and the cluster has room; ``RankGroup.settle``) and
redoes its steps, while the other ranks keep what they have done. Before a rank reads, its node's files
must be on the machine it runs on: a rank re-placed on another machine has its node fetched again
there (``files.stale`` / ``files.fetch``). Ranks waiting for a tensor from a restarted sender simply
receive it again. Restarts are bounded per rank; past the bound, or for any error that is not a death
(a truncated file, a bad plan), the load fails with the ranks, nodes and phase named. Once every rank
is ready, each is asked once more that it lives: a rank that died after finishing is brought back too.

The same machinery restores ranks lost during inference (``ranks=`` the lost ones; the others are
ready and keep their state): only the lost ranks read their bytes again.

Runs on the driver, inside ``orchestrator.load`` and ``LoadedModel``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from orchestrator.progress import NodeProgress
from orchestrator.rank_group import RankGroup
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


def tie_senders(plan: LoadPlan) -> dict[int, list[int]]:
    """Receiving rank → the ranks of other stages that hand it tied tensors."""
    senders_of: dict[int, list[int]] = {}
    for r in plan.ranks:
        for s in r.sends:
            senders_of.setdefault(s.to_rank, []).append(r.rank)
    return senders_of


def hand_over_ties(group: RankGroup, senders_of: dict[int, list[int]], receivers: list[int]):
    """Each receiver takes its tied tensors from their senders (``tied_for`` → ``receive_tied``); returns
    ``call_each``'s (results, errors)."""
    refs = {to: tuple(group.submit("tied_for", to, ranks=sorted(set(senders_of[to]))).values()) for to in receivers}
    # Object refs as top-level arguments: Ray moves each tensor node to node, not via the driver.
    return group.call_each("receive_tied", per_rank_args=[refs[to] for to in receivers], ranks=receivers)


def materialize(plan: LoadPlan, group: RankGroup, files, *, progress: bool, ranks: list[int] | None = None) -> dict[int, RankReport]:
    """Run load / ties / finalize on ``ranks`` (default all) with bounded restarts; returns rank → report.

    ``files`` (``orchestrator.fetch_stage.FilesInPlace`` or ``NodeFetch``) says where each rank reads, and
    fetches again for ranks re-placed on another machine."""
    import ray

    state = {r: "new" for r in (group.ranks if ranks is None else ranks)}
    reports: dict[int, RankReport] = {}
    senders_of = tie_senders(plan)
    bar = NodeProgress(plan, enabled=progress)
    done_bytes: dict[int, tuple[int, int]] = {}

    def poll(of: list[int] | None = None) -> None:
        """Update the bar from the given ranks (once they have finished), else from every rank still loading."""
        targets = of if of is not None else [r for r in state if state[r] == "new"]
        refs = group.submit("get_progress", ranks=targets)
        for r, ref in refs.items():
            try:
                done_bytes[r] = ray.get(ref, timeout=10)
            except Exception:  # noqa: BLE001 - a rank being restarted has no progress to show
                pass
        bar.update(done_bytes)

    def restarted(dead: set[int]) -> None:
        """Ranks restarted: they start over; receivers not yet ready take their tied tensors again."""
        for r in dead:
            state[r] = "new"
            done_bytes.pop(r, None)
        for r in state:
            if state[r] == "tied" and any(s in dead for s in senders_of.get(r, [])):
                state[r] = "loaded"

    def recover(errors: dict[int, BaseException], phase: str, suspects=()) -> None:
        restarted(group.settle(errors, phase=phase, suspects=suspects))

    try:
        while True:
            todo = [r for r in state if state[r] == "new"]
            stale = files.stale(todo)
            if stale:  # re-placed, or dead on a lost node: bring the dead back first, then fetch where they are
                dead = group.dead_ranks(stale)
                if dead:
                    group.revive(dead, phase="fetch")
                    restarted(dead)
                files.fetch(sorted({group.node_of_rank[r] for r in files.stale(todo)}))
            if todo:
                results, errors = group.call_each(
                    "load", per_rank_args=[(files.paths(r), files.bytes_fetched(r)) for r in todo], ranks=todo,
                    poll=_throttled(poll, 0.5),
                )
                poll(of=list(results))  # the final figures of the ranks that finished
                for r in results:
                    state[r] = "loaded"
                if errors:
                    recover(errors, "read")
                    continue
            receivers = [r for r in state if state[r] == "loaded" and r in senders_of]
            if receivers:
                results, errors = hand_over_ties(group, senders_of, receivers)
                for r in results:
                    state[r] = "tied"
                if errors:  # a failed receive may be its sender's death: ask the senders too
                    recover(errors, "tie exchange", suspects=[s for r in errors for s in senders_of[r]])
                    continue
            todo = [r for r in state if state[r] == "tied" or (state[r] == "loaded" and r not in senders_of)]
            if todo:
                results, errors = group.call_each("finalize", ranks=todo)
                for r, report in results.items():
                    state[r] = "ready"
                    reports[r] = report
                if errors:
                    recover(errors, "finalize")
                    continue
            if all(s == "ready" for s in state.values()):
                dead = group.dead_ranks(list(state))  # died after it was ready, while others were still loading
                if not dead:
                    break
                group.revive(dead, phase="wait for the other ranks")
                restarted(dead)
    finally:
        bar.close()
    return {r: replace(report, restarts=group.restarts[r]) for r, report in reports.items()}
