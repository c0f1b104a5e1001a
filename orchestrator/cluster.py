"""Connect to a Ray cluster, or start an embedded local one with simulated nodes.

Order of preference, as the design asks: the cluster this process is already connected to; an
explicit ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets for the entrypoint); a running
local cluster that ``ray.init(address="auto")`` finds; else (or with ``address="embedded"``) an
embedded cluster started here, with ``nodes`` simulated nodes (each its own node id, so a
STRICT_SPREAD placement really puts ranks on distinct nodes). An embedded cluster is owned by the
load and torn down with it.

An embedded cluster is not open to anyone else. Its nodes run on 127.0.0.1, the one node address for
which Ray binds every server it starts — GCS, raylets, object managers, workers, agents — to loopback
instead of every interface. Loopback is still reachable by the machine's other users, so Ray's token
authentication is on: a fresh random token in a file only this user can read (a 0600 file in a 0700
folder), given to the cluster's processes and to this driver through ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH`` for the cluster's lifetime, and removed with it. (Ray turns a driver's
``127.0.0.1`` address into the host's own address before dialing it; ``EmbeddedCluster.connect``, and
``join`` for any process given such a cluster's address, keep it on loopback. Another process joining
it needs its token: the environment of a process the driver starts carries it.)

A wrong address never hangs: the GCS port is probed with a timeout before ``ray.init``.

Runs on the driver; the only module that starts or stops Ray.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from planning.errors import MeshloadError

log = logging.getLogger("meshload")

LOOPBACK = "127.0.0.1"  # Ray binds loopback-only exactly when a node's address is this string
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED")
LEAN_SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "enable_metrics_collection": False}


class ClusterError(MeshloadError, RuntimeError):
    """The Ray cluster cannot be reached or started."""


@dataclass
class RayConnection:
    """A connection made (or reused) for one load; ``close`` undoes only what this object started."""

    address: str
    embedded: object | None = None  # the EmbeddedCluster we started
    connected_here: bool = False

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


class EmbeddedAuth:
    """A private token for one embedded cluster, and the environment that makes Ray use it (see the module
    docstring). ``close()`` restores the environment as it was and removes the token."""

    def __init__(self) -> None:
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        self.folder = tempfile.mkdtemp(prefix="meshload-ray-auth-")  # 0700, a name nobody can predict
        self.token_path = os.path.join(self.folder, "auth_token")
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate_new_authentication_token())
        self._saved = {k: os.environ.get(k) for k in AUTH_ENV}
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path, "RAY_USAGE_STATS_ENABLED": "0"})
        _reload_ray_auth()

    def close(self) -> None:
        if self._saved is None:
            return
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved = None
        shutil.rmtree(self.folder, ignore_errors=True)
        _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Make this process's Ray see the authentication settings now in its environment (Ray caches them)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def join(address: str, **init_kwargs) -> None:
    """``ray.init(address=...)`` — over loopback when every node of that cluster is on 127.0.0.1 (a cluster
    bound to loopback, such as an embedded one, which Ray would otherwise dial at the host's own address)."""
    import ray

    with _loopback_driver() if _on_loopback(address) else nullcontext():
        ray.init(address=address, **init_kwargs)


def _on_loopback(address: str) -> bool:
    host = address.rpartition(":")[0]
    if host not in (LOOPBACK, "localhost"):
        return False
    try:
        from ray._raylet import GcsClient

        nodes = GcsClient(address=f"{LOOPBACK}:{address.rpartition(':')[2]}").get_all_node_info(timeout=10).values()
    except Exception:  # noqa: BLE001 - not a cluster we can ask (then Ray's own rules apply)
        return False
    return bool(nodes) and all(n.node_manager_address == LOOPBACK for n in nodes)


@contextmanager
def _loopback_driver():
    """While connecting a driver: let ``127.0.0.1`` mean loopback (Ray otherwise dials the host's own
    address instead, where a loopback-bound cluster does not listen). Ray's own switch for this,
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, is read when Ray is imported; this sets the same flag."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


class EmbeddedCluster:
    """A ``ray.cluster_utils.Cluster`` of ``num_nodes`` simulated nodes on loopback, token-authenticated
    (module docstring). ``connect()`` joins this process to it; ``shutdown()`` stops every node and
    removes the token. Other attributes are the ``Cluster``'s (``address``, ``head_node``, ...)."""

    def __init__(self, num_nodes: int, *, cpus_per_node: int, gpus_per_node: int = 0, object_store_bytes: int = 256 << 20):
        from ray.cluster_utils import Cluster

        self.auth = EmbeddedAuth()
        self.cluster = None
        common = dict(num_cpus=cpus_per_node, num_gpus=gpus_per_node, object_store_memory=object_store_bytes)
        try:
            self.cluster = Cluster(
                initialize_head=True,
                head_node_args=dict(**common, node_ip_address=LOOPBACK, include_dashboard=False, _system_config=LEAN_SYSTEM_CONFIG),
            )
            for _ in range(1, num_nodes):
                self.cluster.add_node(**common, node_ip_address=LOOPBACK)
            self.cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()
            raise

    def __getattr__(self, name: str):
        if name == "cluster":
            raise AttributeError(name)
        return getattr(self.cluster, name)

    def connect(self, **init_kwargs) -> None:
        """``ray.init`` to this cluster, over loopback, with its token."""
        import ray

        with _loopback_driver():
            ray.init(address=self.cluster.address, **init_kwargs)


    def shutdown(self) -> None:
        try:
            if self.cluster is not None:
                self.cluster.shutdown()
        finally:
            self.auth.close()


def start_embedded(
    num_nodes: int, *, cpus_per_node: int, gpus_per_node: int = 0, object_store_bytes: int = 256 << 20
) -> EmbeddedCluster:
    """An embedded cluster of ``num_nodes`` simulated nodes on loopback, token-authenticated (one real node
    when using GPUs); join it with ``.connect()``."""
    return EmbeddedCluster(num_nodes, cpus_per_node=cpus_per_node, gpus_per_node=gpus_per_node, object_store_bytes=object_store_bytes)


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
        join(address, log_to_driver=True)
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
        cluster.connect(log_to_driver=True)
    except BaseException:
        cluster.shutdown()
        raise
    return RayConnection(address=cluster.address, embedded=cluster, connected_here=True)
