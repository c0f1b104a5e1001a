"""A placement group with one bundle per planned node, spread over distinct Ray nodes.

Bundle ``k`` holds the resources of every rank the plan puts on node ``k``; ``STRICT_SPREAD`` makes
Ray put the bundles on distinct nodes. An impossible request stays pending forever in Ray, so we
wait with a timeout, remove the group, and say what was asked and what the cluster has.

Runs on the driver.
"""

from __future__ import annotations

import time

from planning.errors import MeshloadError


class PlacementError(MeshloadError, RuntimeError):
    """The cluster cannot host the planned ranks (not enough nodes, CPUs or GPUs)."""


def bundles_for(node_of_rank: list[int], num_nodes: int, *, cpus_per_rank: float, gpus_per_rank: float) -> list[dict]:
    bundles = []
    for node in range(num_nodes):
        count = node_of_rank.count(node)
        bundle = {"CPU": cpus_per_rank * count}
        if gpus_per_rank:
            bundle["GPU"] = gpus_per_rank * count
        bundles.append({k: v for k, v in bundle.items() if v})
    return bundles


def _cluster_summary() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    parts = []
    for n in nodes:
        res = n.get("Resources", {})
        parts.append(f"{n.get('NodeManagerAddress')}: CPU={res.get('CPU', 0):g} GPU={res.get('GPU', 0):g}")
    available = ray.available_resources()
    return (
        f"{len(nodes)} alive node(s) [{'; '.join(parts)}]; available now: "
        f"CPU={available.get('CPU', 0):g} GPU={available.get('GPU', 0):g}"
    )


def create_placement_group(bundles: list[dict], *, timeout_s: float, name: str = "", poll=None):
    """Reserve ``bundles`` on distinct nodes or raise ``PlacementError`` after ``timeout_s``; ``poll()`` is
    called about twice a second while waiting (whatever it raises removes the group and propagates)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    strategy = "STRICT_SPREAD" if len(bundles) > 1 else "PACK"
    pg = placement_group(bundles, strategy=strategy, name=name)
    deadline = time.monotonic() + timeout_s
    try:
        while not pg.wait(timeout_seconds=max(0.0, min(0.5, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise PlacementError(
                    f"could not place {len(bundles)} node bundle(s) {bundles} with {strategy} within {timeout_s:g}s; "
                    f"the cluster has {_cluster_summary()}. Use fewer nodes/ranks or add nodes."
                )
            if poll is not None:
                poll()
    except BaseException:
        remove_placement_group(pg)
        raise
    return pg


def remove(pg) -> None:
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(pg)
