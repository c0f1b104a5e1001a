"""Faults and bad input on a live cluster: a killed rank is restarted and the load completes bit-exact;
repeated deaths, impossible placements and Ctrl-C end in clear errors with nothing left alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import orchestrator
from orchestrator.placement import PlacementError
from orchestrator.rank_group import RankError
from tests import checkpoints, fault_workers
from tests.conftest import live_actors_and_groups, wait_until_clean

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=True)
    return path, checkpoints.state_of(path)


def test_rank_killed_mid_load_is_restarted_and_load_is_bit_exact(ray_cluster, ckpt, tmp_path):
    path, state = ckpt
    worker = fault_workers.killed_mid_load(str(tmp_path), victim=1)
    with orchestrator.load(path, tp=2, pp=2, nodes=2, worker_cls=worker, progress=False) as m:
        assert [r.restarts for r in m.report] == [0, 1, 0, 0]
        assert os.listdir(tmp_path) == ["rank1-0"]  # the victim really died once
        checkpoints.assert_state_equal(m.full_state_dict(), state)
    assert wait_until_clean() == ([], [])


def test_tied_sender_killed_is_restarted_and_receiver_gets_it(ray_cluster, ckpt, tmp_path):
    path, state = ckpt
    # rank 0 (stage 0) reads the tied embedding and sends it to rank 2 (stage 1): kill it late in its load
    worker = fault_workers.killed_mid_load(str(tmp_path), victim=0, after_items=8)
    with orchestrator.load(path, tp=2, pp=2, nodes=2, worker_cls=worker, progress=False) as m:
        assert m.report[0].restarts == 1
        checkpoints.assert_state_equal(m.full_state_dict(), state)
    assert wait_until_clean() == ([], [])


@pytest.mark.parametrize(
    "phase, victim",
    [("start", 1), ("import", 1), ("attach", 1), ("tie send", 0), ("tie receive", 1), ("finalize", 1)],
)
def test_rank_killed_in_any_phase_of_the_load_is_restarted_and_load_is_bit_exact(ray_cluster, ckpt, tmp_path, phase, victim):
    """pp=2 over 2 nodes, tied embeddings: rank 0 (stage 0) reads the embedding and hands it to rank 1's
    LM head, so every phase of the load runs; the victim's process is SIGKILLed in ``phase``, once."""
    path, state = ckpt
    worker = fault_workers.killed_in(phase, str(tmp_path), victim=victim)
    with orchestrator.load(path, pp=2, nodes=2, worker_cls=worker, progress=False) as m:
        assert len(os.listdir(tmp_path)) == 1  # the victim really died, once
        assert [r.restarts for r in m.report] == [int(r == victim) for r in range(2)]
        checkpoints.assert_state_equal(m.full_state_dict(), state)
    assert wait_until_clean() == ([], [])


def test_rank_that_keeps_dying_as_it_starts_is_named_with_its_node_and_phase(ray_cluster, ckpt, tmp_path):
    """The issue's case: a rank's process SIGKILLed as soon as it appears, every time. Its node is known
    from its placement bundle before it ever answers."""
    path, _ = ckpt
    worker = fault_workers.killed_in("start", str(tmp_path), victim=1, times=5)
    with pytest.raises(RankError, match=r"rank 1 \(node 127\.0\.0\.\d\) died 2 times during start; giving up after 1 restart"):
        orchestrator.load(path, tp=2, nodes=2, worker_cls=worker, max_restarts=1, progress=False)
    assert len(os.listdir(tmp_path)) == 2
    assert wait_until_clean() == ([], [])


def test_repeated_deaths_give_up_with_the_rank_named(ray_cluster, ckpt, tmp_path):
    path, _ = ckpt
    worker = fault_workers.killed_mid_load(str(tmp_path), victim=1, times=5)
    with pytest.raises(RankError, match=r"rank 1 \(node 127\.0\.0\.\d\) died 2 times during read; giving up after 1 restart"):
        orchestrator.load(path, tp=2, nodes=2, worker_cls=worker, max_restarts=1, progress=False)
    assert len(os.listdir(tmp_path)) == 2
    assert wait_until_clean() == ([], [])


def test_more_ranks_than_the_cluster_can_place(ray_cluster, ckpt):
    path, _ = ckpt
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        orchestrator.load(path, tp=4, nodes=4, placement_timeout_s=3, progress=False)  # the cluster has 3 nodes
    assert time.monotonic() - t0 < 30  # an error after the timeout, not a hang
    assert "could not place 4 node bundle(s)" in str(err.value) and "3 alive node(s)" in str(err.value)
    assert wait_until_clean() == ([], [])


def _ctrl_c_enabled() -> None:
    """The driver gets SIGINT's default disposition, as from a terminal: a test suite started in the
    background by a shell has SIGINT ignored, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _driver_loading(ray_cluster, path: str, marker_dir, **popen_options) -> subprocess.Popen:
    """A driver process joined to the shared cluster, returned once both of its ranks are reading (slowly)."""
    script = f"""
import sys, faulthandler, signal
faulthandler.register(signal.SIGUSR1, all_threads=True)
sys.path.insert(0, {os.getcwd()!r})
import orchestrator
from tests import fault_workers
orchestrator.load({path!r}, tp=2, nodes=2, worker_cls=fault_workers.slow_load(60, marker_dir={str(marker_dir)!r}), progress=False)
"""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen_options)
    try:
        deadline = time.monotonic() + 120
        while len([f for f in os.listdir(marker_dir) if f.startswith("loading-")]) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "ranks never started loading"
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        raise
    return proc


def test_ctrl_c_on_the_driver_removes_everything(ray_cluster, ckpt, tmp_path):
    path, _ = ckpt
    proc = _driver_loading(ray_cluster, path, tmp_path, preexec_fn=_ctrl_c_enabled)
    try:
        assert live_actors_and_groups()[0], "the load's actors should be alive now"
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(3)
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError("driver still running 60 s after SIGINT:\n" + err[-20000:])
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert wait_until_clean() == ([], [])


def test_driver_killed_mid_load_leaves_no_actor_or_placement_group(ray_cluster, ckpt, tmp_path):
    """A driver SIGKILLed (a crashed notebook, ``ray job stop``) while its ranks read: Ray's ownership
    removes what it made — its actors and placement group are neither detached nor named."""
    path, _ = ckpt
    proc = _driver_loading(ray_cluster, path, tmp_path)
    try:
        actors, groups = live_actors_and_groups()
        assert len(actors) == 2 and len(groups) == 1, (actors, groups)
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert wait_until_clean(timeout_s=60) == ([], [])


def test_ctrl_c_stops_an_embedded_cluster_too(ckpt, tmp_path):
    """Without a cluster to join, load starts an embedded one; Ctrl-C must stop its processes too."""
    path, _ = ckpt
    script = f"""
import sys
sys.path.insert(0, {os.getcwd()!r})
import ray, orchestrator
import orchestrator.cluster as cluster
from tests import fault_workers
real_start = cluster.start_embedded
def start(*a, **k):
    c = real_start(*a, **k)
    print("SESSION", c.head_node.get_session_dir_path(), flush=True)
    return c
cluster.start_embedded = start
orchestrator.load({path!r}, tp=2, nodes=2, address="embedded",
                  worker_cls=fault_workers.slow_load(60, marker_dir={str(tmp_path)!r}), progress=False)
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_enabled)
    try:
        session = None
        deadline = time.monotonic() + 180
        while session is None:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.communicate()
            if line.startswith("SESSION"):
                session = line.split()[1]
        while len([f for f in os.listdir(tmp_path) if f.startswith("loading-")]) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "ranks never started loading"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "KeyboardInterrupt" in err, (proc.returncode, err[-20000:])
    deadline = time.monotonic() + 30
    while True:
        left = subprocess.run(["pgrep", "-f", os.path.basename(session)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"processes of the embedded cluster still alive: {left}"
