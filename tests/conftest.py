"""Shared fixtures: one multi-node Ray cluster for the whole session, and checkpoint factories.

The cluster has three simulated nodes on 127.0.0.2-4 (each its own IP and node id, so placement
really spreads ranks). Tests that break a cluster start their own (see ``fresh_cluster``).

Markers hold: a test that takes ``ray_cluster`` must be marked ``cluster``, one that takes
``fresh_cluster`` ``destructive`` (collection fails otherwise), so ``-m "not cluster and not destructive"``
(``make test-fast``) selects the unit tests. Under ``MESHLOAD_TEST_NO_RAY=1`` (what ``make test-fast``
sets) no Ray cluster may start at all: both fixtures fail at once, and every Ray session — of this
process or of a driver a test starts — is caught afterwards by the session folder Ray writes into the
run's private ``RAY_TMPDIR``.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The object-storage tests' server (moto, on loopback: tests/s3_server.py) accepts any credentials; the S3
# source takes them from each node's environment, which Ray's workers inherit from this process.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "meshload-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "meshload-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(1)

NO_RAY = os.environ.get("MESHLOAD_TEST_NO_RAY") == "1"
_NO_RAY_DIR: str | None = None
FIXTURE_MARKS = {"ray_cluster": "cluster", "fresh_cluster": "destructive"}


def pytest_configure(config):
    global _NO_RAY_DIR
    if NO_RAY:
        # Every Ray start writes a session folder under RAY_TMPDIR; drivers the tests start inherit it.
        _NO_RAY_DIR = tempfile.mkdtemp(prefix="meshload-noray-")
        os.environ["RAY_TMPDIR"] = _NO_RAY_DIR


def pytest_collection_modifyitems(config, items):
    unmarked = [f"{item.nodeid} (uses {fixture}, not marked {mark})"
                for item in items for fixture, mark in FIXTURE_MARKS.items()
                if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(mark) is None]
    if unmarked:
        raise pytest.UsageError("tests that start a Ray cluster must carry its marker:\n  " + "\n  ".join(unmarked))


def pytest_sessionfinish(session, exitstatus):
    if _NO_RAY_DIR is None:
        return
    started = sorted(os.listdir(_NO_RAY_DIR))
    shutil.rmtree(_NO_RAY_DIR, ignore_errors=True)
    if started:
        session.config.get_terminal_writer().line(
            f"MESHLOAD_TEST_NO_RAY=1, yet Ray started during the run (left {started} in its RAY_TMPDIR): "
            f"mark the test that starts it 'cluster'", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _refuse_under_no_ray(fixture: str) -> None:
    if NO_RAY:
        pytest.fail(f"{fixture} under MESHLOAD_TEST_NO_RAY=1 (make test-fast): this test starts a Ray cluster; "
                    f"mark it {FIXTURE_MARKS[fixture]!r}")


@pytest.fixture(autouse=True)
def _own_plan_cache(tmp_path_factory, monkeypatch):
    """Each test starts with an empty plan cache of its own (drivers it starts inherit it), so no test
    reuses a plan another test made, and nothing is written under ~/.cache."""
    monkeypatch.setenv("MESHLOAD_PLAN_CACHE", str(tmp_path_factory.mktemp("plan-cache")))


@pytest.fixture(autouse=True)
def _no_default_dtype_leak():
    """transformers changes torch's process-wide default dtype while building models; a test that
    leaves it changed would silently make later tests build in that dtype."""
    yield
    leaked = torch.get_default_dtype()
    if leaked != torch.float32:
        torch.set_default_dtype(torch.float32)
        pytest.fail(f"the test left torch's default dtype at {leaked}")


CLUSTER_NODES = 3
CPUS_PER_NODE = 4


def _start_cluster(
    num_nodes: int,
    cpus: int = CPUS_PER_NODE,
    *,
    env_vars: list[dict[str, str]] | None = None,
    first_ip: int = 2,
    head_cpus: int | None = None,
    **head_args,
):
    """``num_nodes`` simulated nodes on 127.0.0.<first_ip>+; ``env_vars[k]``: extra environment of node k's
    raylet (its workers inherit it, e.g. a per-node ``MESHLOAD_CACHE_DIR``)."""
    from ray.cluster_utils import Cluster

    from orchestrator.cluster import LEAN_SYSTEM_CONFIG

    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            num_cpus=cpus if head_cpus is None else head_cpus,
            node_ip_address=f"127.0.0.{first_ip}",
            include_dashboard=False,
            object_store_memory=128 << 20,
            _system_config=LEAN_SYSTEM_CONFIG,
            **({"env_vars": env_vars[0]} if env_vars else {}),
            **head_args,
        ),
    )
    try:
        for k in range(1, num_nodes):
            extra = {"env_vars": env_vars[k]} if env_vars else {}
            cluster.add_node(num_cpus=cpus, node_ip_address=f"127.0.0.{first_ip + k}", object_store_memory=128 << 20, **extra)
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """A 3-node cluster shared by every test that needs one; the test process is connected to it."""
    _refuse_under_no_ray("ray_cluster")
    import ray

    cluster = _start_cluster(CLUSTER_NODES)
    try:
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def fresh_cluster():
    """A private cluster for a destructive test; the shared one (if any) is disconnected meanwhile."""
    _refuse_under_no_ray("fresh_cluster")
    import ray

    was_connected = ray.is_initialized()
    shared_address = ray.get_runtime_context().gcs_address if was_connected else None
    if was_connected:
        ray.shutdown()
    clusters = []

    def make(num_nodes: int = 2, cpus: int = 2, **kwargs):
        cluster = _start_cluster(num_nodes, cpus, **kwargs)
        clusters.append(cluster)
        ray.init(address=cluster.address)
        return cluster

    try:
        yield make
    finally:
        ray.shutdown()
        for c in clusters:
            c.shutdown()
        if shared_address:
            ray.init(address=shared_address)


def live_actors_and_groups() -> tuple[list[str], list[str]]:
    """Actors still alive and placement groups not removed, across the cluster."""
    import ray._private.state as state
    import ray

    actors = [a["ActorClassName"] for a in state.actors().values() if a["State"] != "DEAD"]
    groups = [g["placement_group_id"] for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    return actors, groups


def wait_until_clean(timeout_s: float = 20.0) -> tuple[list[str], list[str]]:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        actors, groups = live_actors_and_groups()
        if (not actors and not groups) or time.monotonic() > deadline:
            return actors, groups
        time.sleep(0.2)


def remove_a_rank_node_while_loading(cluster, marker_dir: str) -> dict:
    """In the background: once both ranks are loading (``fault_workers.slow_load`` markers in
    ``marker_dir``), remove a worker node that hosts one of them."""
    import threading
    import time

    import ray._private.state as state

    out: dict = {}

    def run() -> None:
        deadline = time.monotonic() + 120
        while len([f for f in os.listdir(marker_dir) if f.startswith("loading-")]) < 2:
            if time.monotonic() > deadline:
                out["error"] = "ranks never started loading"
                return
            time.sleep(0.1)
        ips = {a["Address"]["IPAddress"] for a in state.actors().values()
               if a["State"] == "ALIVE" and a["ActorClassName"].endswith("SlowLoad")}
        victim = next(n for n in cluster.worker_nodes if n.node_ip_address in ips)
        out["removed_ip"] = victim.node_ip_address
        cluster.remove_node(victim, allow_graceful=False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    out["thread"] = thread
    return out
