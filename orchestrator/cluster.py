"""Connect to a Ray cluster, or start an embedded local one with simulated nodes.

Order of preference, as the design asks: the cluster this process is already connected to; an
explicit ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets for the entrypoint); a running
local cluster that ``ray.init(address="auto")`` finds; else (or with ``address="embedded"``) an
embedded cluster started here, with
``nodes`` simulated nodes on 127.0.0.2, 127.0.0.3, ... (each its own IP and node id, so a
STRICT_SPREAD placement really puts ranks on distinct nodes). An embedded cluster is owned by the
load and torn down with it.

A wrong address never hangs: the GCS port is probed with a timeout before ``ray.init``.

Runs on the driver; the only module that starts or stops Ray.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

from planning.errors import MeshloadError

log = logging.getLogger("meshload")

EMBEDDED_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Token auth (on by default in recent Ray) is pointless for a cluster bound to loopback and
    # breaks `ray job submit` from another shell; see RAY_NOTES.md.
    "RAY_AUTH_MODE": "disabled",
}
LEAN_SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "enable_metrics_collection": False}


class ClusterError(MeshloadError, RuntimeError):
    """The Ray cluster cannot be reached or started."""


@dataclass
class RayConnection:
    """A connection made (or reused) for one load; ``close`` undoes only what this object started."""

    address: str
    embedded: object | None = None  # ray.cluster_utils.Cluster we started
    connected_here: bool = False
    node_ips: list[str] = field(default_factory=list)

    def close(self) -> None:
        import ray

        if self.connected_here and ray.is_initialized():
            ray.shutdown()
        if self.embedded is not None:
            try:
                self.embedded.shutdown()
            finally:
                self.embedded = None
        self.connected_here = False


def probe_address(address: str, *, timeout_s: float) -> None:
    """Fail fast with a clear message if ``host:port`` does not accept connections."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r}: expected host:port (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc}); check the address and that the head is running") from None


def start_embedded(
    num_nodes: int, *, cpus_per_node: int, gpus_per_node: int = 0, object_store_bytes: int = 256 << 20
):
    """An embedded cluster of ``num_nodes`` simulated nodes on 127.0.0.2+ (one real node when using GPUs)."""
    for key, value in EMBEDDED_ENV.items():
        os.environ.setdefault(key, value)
    from ray.cluster_utils import Cluster

    common = dict(num_cpus=cpus_per_node, num_gpus=gpus_per_node, object_store_memory=object_store_bytes)
    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            **common, node_ip_address="127.0.0.2", include_dashboard=False, _system_config=LEAN_SYSTEM_CONFIG
        ),
    )
    try:
        for k in range(1, num_nodes):
            cluster.add_node(**common, node_ip_address=f"127.0.0.{2 + k}")
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def connect(
    address: str | None,
    *,
    num_nodes: int,
    cpus_per_node: int,
    gpus_per_node: int = 0,
    timeout_s: float = 30.0,
) -> RayConnection:
    """Reuse, join, or start a cluster (see module docstring)."""
    import ray

    if ray.is_initialized():
        if address and address not in ("auto",):
            current = ray.get_runtime_context().gcs_address
            if current != address:
                raise ClusterError(f"this process is already connected to Ray at {current}, not {address}")
        return RayConnection(address=ray.get_runtime_context().gcs_address)
    if address != "embedded":
        address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "embedded":
        probe_address(address, timeout_s=timeout_s)
        ray.init(address=address, log_to_driver=True)
        return RayConnection(address=address, connected_here=True)
    if address is None:
        try:
            ray.init(address="auto", log_to_driver=True)
            log.info("meshload: joined the running Ray cluster at %s", ray.get_runtime_context().gcs_address)
            return RayConnection(address=ray.get_runtime_context().gcs_address, connected_here=True)
        except ConnectionError:
            pass
    if gpus_per_node and num_nodes > 1:
        raise ClusterError(
            f"nodes={num_nodes} with device='cuda' needs a real multi-node Ray cluster (pass address=...); "
            f"an embedded cluster simulates nodes only on CPU"
        )
    log.info("meshload: starting an embedded Ray cluster with %d simulated node(s)", num_nodes)
    cluster = start_embedded(num_nodes, cpus_per_node=cpus_per_node, gpus_per_node=gpus_per_node)
    try:
        ray.init(address=cluster.address, log_to_driver=True)
    except BaseException:
        cluster.shutdown()
        raise
    return RayConnection(address=cluster.address, embedded=cluster, connected_here=True)
