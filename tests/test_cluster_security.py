"""The Ray cluster meshload starts is not open to others; the rendezvous store is not open to every interface.

- An embedded cluster (``load(..., address="embedded")``, ``make demo``): every socket its processes
  listen on — GCS, raylets, object managers, agents, workers, the driver, the ranks' rendezvous store
  and gloo — is on loopback (read from the sockets themselves with psutil); Ray's token
  authentication is on, with a token file only this user can read, and a GCS call without it (or with
  another token) is refused; the token is on no process's command line; another driver of the user
  joins it (``orchestrator.cluster.join``); the environment is restored and the token removed when the
  cluster stops.
- On the shared test cluster: rank 0's rendezvous store listens on its node's address only, from the
  moment its port is handed out (no pick-release-rebind: nothing else can take the port meanwhile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

import orchestrator
from tests import checkpoints
from tests.conftest import wait_until_clean

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
WILDCARD = ("0.0.0.0", "::")

EMBEDDED_SCRIPT = r"""
import json, os, subprocess, sys
sys.path.insert(0, {repo!r})
import grpc, psutil, torch
import orchestrator
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

before = {{k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}}
m = orchestrator.load({path!r}, tp=2, nodes=2, address="embedded", progress=False)
m.logits(torch.tensor([[1, 2, 3]]))  # the ranks' process group, its rendezvous store and gloo are up
cluster = m._connection.embedded
token_path = os.environ["RAY_AUTH_TOKEN_PATH"]
token = open(token_path).read().strip()
tree = [psutil.Process()] + psutil.Process().children(recursive=True)
listening = sorted({{(p.name(), c.laddr.ip, c.laddr.port) for p in tree
                    for c in p.net_connections("inet") if c.status == "LISTEN"}})
cmdlines = [" ".join(p.cmdline()) for p in tree]

def gcs_call(metadata):
    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(cluster.address))
    try:
        reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=20)
        return "OK %d nodes" % len(reply.node_info_list)
    except grpc.RpcError as exc:
        return "%s: %s" % (exc.code().name, exc.details())

out = dict(
    mode=os.environ.get("RAY_AUTH_MODE"),
    token_mode=oct(os.stat(token_path).st_mode & 0o777),
    folder_mode=oct(os.stat(os.path.dirname(token_path)).st_mode & 0o777),
    listening=listening,
    processes=len(tree),
    token_in_cmdline=any(token in c for c in cmdlines),
    no_token=gcs_call(()),
    wrong_token=gcs_call((("authorization", "Bearer " + "0" * 64),)),
    right_token=gcs_call((("authorization", "Bearer " + token),)),
    address=cluster.address,
)
# another driver of this user (a benchmark's peer, say) joins it: over loopback, with the token it inherits
peer = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); import ray; "
                       "from orchestrator.cluster import join; join(%r, log_to_driver=False); "
                       "print('PEER', len(ray.nodes()))" % ({repo!r}, cluster.address)],
                      capture_output=True, text=True, timeout=180)
out["peer"] = (peer.stdout.strip().splitlines() or [peer.stderr[-500:]])[-1]
m.shutdown()
out.update(after={{k: os.environ.get(k) for k in before}}, before=before, token_left=os.path.exists(token_path))
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.destructive
@pytest.mark.timeout(400)
def test_the_embedded_cluster_listens_on_loopback_only_and_needs_its_token(tmp_path):
    path = checkpoints.llama(str(tmp_path / "llama"), tied=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # conftest's RAY_AUTH_MODE=disabled stays
    proc = subprocess.run([sys.executable, "-c", EMBEDDED_SCRIPT.format(repo=REPO, path=path)], env=env,
                          capture_output=True, text=True, timeout=360)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["mode"] == "token" and out["address"].startswith("127.0.0.1:")
    assert (out["token_mode"], out["folder_mode"]) == ("0o600", "0o700")
    names = {name for name, _, _ in out["listening"]}
    assert {"gcs_server", "raylet"} <= names and len(out["listening"]) >= 10, out["listening"]
    exposed = [entry for entry in out["listening"] if entry[1] not in LOOPBACK]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert out["no_token"].startswith("UNAUTHENTICATED"), out["no_token"]
    assert out["wrong_token"].startswith("UNAUTHENTICATED"), out["wrong_token"]
    assert out["right_token"] == "OK 2 nodes", out["right_token"]
    assert not out["token_in_cmdline"]
    assert out["peer"] == "PEER 2", out["peer"]
    assert out["after"] == out["before"] and not out["token_left"]


def _listening(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"}


def _ray_worker_ports() -> set[int]:
    """The ports Ray's own worker servers listen on (every actor's address in the GCS): not meshload's."""
    import ray._private.state as state

    return {a["Address"]["Port"] for a in state.actors().values() if a["State"] == "ALIVE"}


@pytest.mark.cluster
def test_the_rendezvous_store_listens_on_the_node_address_from_the_moment_its_port_is_given(ray_cluster, tmp_path):
    path = checkpoints.llama(str(tmp_path / "llama"), tied=False)
    with orchestrator.load(path, tp=2, nodes=2, progress=False) as m:
        group = m._group
        wheres = group.call("where")
        pids = [w["pid"] for w in wheres]
        ip, port = group.call("pick_port", ranks=[0])[0]
        assert ip == wheres[0]["node_ip"] and ip.startswith("127.0.0.")
        # already listening, on that address alone: the port was never released for someone else to take
        assert (ip, port) in _listening(pids[0])
        assert not any(p == port for a, p in _listening(pids[0]) if a != ip)
        m.logits(checkpoints.PROMPT)  # inference sets up its own store the same way; the process group runs
        ray_ports = _ray_worker_ports()
        for rank, pid in enumerate(pids):
            ours = {(a, p) for a, p in _listening(pid) if p not in ray_ports}
            assert not [a for a, _ in ours if a in WILDCARD], f"rank {rank} listens on every interface: {ours}"
        assert any(a == ip and p not in ray_ports for a, p in _listening(pids[0])), "rank 0 serves no store"
    assert wait_until_clean() == ([], [])
