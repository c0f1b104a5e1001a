"""New weights in place: the ranks of a loaded model read another checkpoint's values into their storage.

What RL post-training and training-then-serve loops do thousands of times: the next step of the
weights, same architecture and shapes, into the model the ranks already hold — no new actors, no new
allocation, no process group formed again. The driver re-makes the plan against the new checkpoint
(``planning.retarget``: refused, naming tensor and values, unless a fresh load would plan the same
tensors); each rank then reads only its own byte ranges into the tensors it holds (``RankWorker.reload``,
through the same reader as a load), and tied tensors are handed across stages again, into the
receivers' storage. The per-rank I/O is that of a load minus everything else a load does.

``reload_ranks`` runs inside ``LoadedModel.update_weights``'s restore machinery: a rank that dies is
restarted with the new plan (reading the new checkpoint) and the reload runs again.

Runs on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.materialize import hand_over_ties, tie_senders
from orchestrator.rank_group import RankGroup, group_errors
from planning.plan import LoadPlan


@dataclass(frozen=True, slots=True)
class WeightsUpdate:
    """What ``LoadedModel.update_weights`` did."""

    source: str  # the checkpoint now loaded
    seconds: float  # the whole call, on the driver
    plan_seconds: float  # of which: resolving the checkpoint (headers) and re-making the plan
    fetch_seconds: float  # of which: Hub checkpoints, the nodes fetching their ranges (0 for local folders)
    bytes_read: tuple[int, ...]  # per rank
    bytes_fetched: tuple[int, ...]  # per rank (Hub)


def reload_ranks(plan: LoadPlan, group: RankGroup, files) -> dict[int, int]:
    """Every rank reads ``plan``'s ranges into its tensors, then receives its tied tensors; rank → bytes read.
    Raises the ranks' errors grouped (``[during update weights]``)."""
    group.replan(plan)  # ranks restarted from now on read the new checkpoint
    refs = group.submit("reload", per_rank_args=[(group.plan_ref, files.paths(r), files.bytes_fetched(r)) for r in group.ranks])
    bytes_read = group.wait(refs, what="update weights")
    senders_of = tie_senders(plan)
    if senders_of:
        _, errors = hand_over_ties(group, senders_of, sorted(senders_of))
        if errors:
            raise group_errors(errors, group.where, phase="update weights")
    return bytes_read
