"""A node lost mid-load or between inference calls (removed from a private ``ray.cluster_utils.Cluster``):
the ranks are re-placed when the cluster still has room and the load completes bit-exact (the call gives
the same logits); otherwise a clear error, nothing left."""

from __future__ import annotations

import time

import pytest
import torch

import orchestrator
from orchestrator.placement import PlacementError
from tests import checkpoints, fault_workers
from tests.conftest import live_actors_and_groups, remove_a_rank_node_while_loading, wait_until_clean

pytestmark = pytest.mark.destructive


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)
    return path, checkpoints.state_of(path)


def test_lost_node_is_replaced_when_the_cluster_has_room(fresh_cluster, ckpt, tmp_path):
    path, state = ckpt
    cluster = fresh_cluster(4, cpus=1, head_cpus=0)  # ranks only on the 3 worker nodes; one is spare
    breaker = remove_a_rank_node_while_loading(cluster, str(tmp_path))
    worker = fault_workers.slow_load(4, marker_dir=str(tmp_path))
    with orchestrator.load(path, tp=2, nodes=2, worker_cls=worker, placement_timeout_s=60, progress=False) as m:
        breaker["thread"].join(timeout=5)
        assert "error" not in breaker, breaker
        assert sum(r.restarts for r in m.report) == 1
        assert breaker["removed_ip"] not in {r.node_ip for r in m.report}
        assert len({r.node_id for r in m.report}) == 2
        checkpoints.assert_state_equal(m.full_state_dict(), state)
    assert wait_until_clean() == ([], [])


def test_lost_node_without_room_is_a_clear_error(fresh_cluster, ckpt, tmp_path):
    path, _ = ckpt
    cluster = fresh_cluster(3, cpus=1, head_cpus=0)  # exactly 2 worker nodes for 2 ranks
    breaker = remove_a_rank_node_while_loading(cluster, str(tmp_path))
    worker = fault_workers.slow_load(4, marker_dir=str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"rank \d \(was on node 127\.0\.0\.\d\) could not be restarted within 5s"):
        orchestrator.load(path, tp=2, nodes=2, worker_cls=worker, placement_timeout_s=5, progress=False)
    assert time.monotonic() - t0 < 90
    assert wait_until_clean() == ([], [])


def test_node_lost_between_inference_calls_is_replaced_and_logits_are_unchanged(fresh_cluster, ckpt):
    path, _ = ckpt
    cluster = fresh_cluster(4, cpus=1, head_cpus=0)  # ranks only on the 3 worker nodes; one is spare
    with orchestrator.load(path, tp=2, nodes=2, progress=False) as m:
        first = m.logits(checkpoints.PROMPT)
        used = {r.node_ip for r in m.report}
        victim = next(n for n in cluster.worker_nodes if n.node_ip_address in used)
        cluster.remove_node(victim, allow_graceful=False)
        deadline = time.monotonic() + 60  # its rank's process outlives its raylet for a moment
        while len(live_actors_and_groups()[0]) == 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        again = m.logits(checkpoints.PROMPT)
        assert torch.equal(again, first)
        moved = [r for r in m.report if r.restarts]
        assert len(moved) == 1 and moved[0].node_ip not in used
        assert len({r.node_id for r in m.report}) == 2
    assert wait_until_clean() == ([], [])
