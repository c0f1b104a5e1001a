"""``ray job submit -- meshload load ...`` end to end, on a Ray cluster of our own started with ``ray start``.

The user's workflow, as the README's "Running on a cluster" gives it: a head started with the dashboard
(which serves ``ray job submit``), a second node joining it, then from another shell
``ray job submit --address http://HEAD:PORT --runtime-env cluster_configs/runtime_env.yaml -- meshload
load MODEL --tp 2 --nodes 2``. The entrypoint runs on the head in the environment of the shell that
started it (so ``.venv/bin`` goes first on the head's PATH); it joins the cluster through the
``RAY_ADDRESS`` that the job sets. The test waits for SUCCEEDED and reads ``ray job logs``: the
per-rank report (one row per rank, one rank on each node IP) and the plain progress lines are in them.

Destructive: a fresh two-node cluster on 127.0.0.5 (head) and 127.0.0.6, every port chosen free, its
own temp dir. Torn down in ``finally`` by signalling exactly the process groups this test started,
then any process of their trees still running (Ray puts worker processes in process groups of their
own) — never ``ray stop``, which would stop every Ray cluster on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml

from tests import checkpoints

pytestmark = pytest.mark.destructive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: ray, meshload
HEAD_IP, WORKER_IP = "127.0.0.5", "127.0.0.6"
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "disabled",  # token auth breaks `ray job submit` from another shell
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops a node at once instead of draining 30 s
}
# ~12 s to both nodes up and ~16 s for the job on an idle 2-core machine; several times that when the
# machine is busy with other test clusters.
START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 120.0
# Lean head, as measured on this 2-core machine: no idle workers prestarted for the first driver, no metrics.
HEAD_SYSTEM_CONFIG = '{"prestart_worker_first_driver": false, "enable_metrics_collection": false}'
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _node_ports(ip: str) -> list[str]:
    """Every port a node listens on, chosen free, so this cluster never collides with another on the machine."""
    flags = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port")
    return [f"--{flag}={_free_port(ip)}" for flag in flags]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(CLUSTER_ENV)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    return env


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time in clock ticks) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), fields[19])  # ppid, starttime
    return table


def _descendants(roots: list[int]) -> dict[int, str]:
    """The roots and every process below them, each with its start time (to tell a reused pid apart)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo += children.get(pid, [])
    return found


def _alive(procs: dict[int, str]) -> list[int]:
    table = _proc_table()
    return sorted(pid for pid, started in procs.items() if pid in table and table[pid][1] == started and _state(pid) != "Z")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _stop(procs: list[subprocess.Popen]) -> list[int]:
    """Stop exactly what this test started: the ``ray start`` processes and everything below them.

    Ray moves worker processes into process groups of their own, so the tree is taken before any
    signal: SIGTERM to each started process group (worker node first), SIGKILL to the groups after a
    grace period, then to any process of the tree still running. Returns the pids that had to be
    killed one by one (they outlived their node).
    """
    tree = _descendants([p.pid for p in procs])
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group outlives its leader: sweep it either way
        except ProcessLookupError:
            pass
        p.wait(timeout=10)
    deadline = time.monotonic() + 10  # workers exit on their own once their raylet is gone
    while (left := _alive(tree)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _wait_for_nodes(dashboard: str, count: int, procs: list[subprocess.Popen], logs: list[str]) -> None:
    from ray.util.state import list_nodes

    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise AssertionError(f"`ray start` exited with {p.returncode}:\n{_tail(log)}")
        try:
            alive = [n for n in list_nodes(address=dashboard, timeout=5) if n.state == "ALIVE"]
            if len(alive) >= count:
                return
        except Exception as exc:  # noqa: BLE001 - the dashboard is still starting
            last_error = exc
        time.sleep(0.5)
    raise AssertionError(f"{count} nodes not up within {START_TIMEOUT_S}s (last error: {last_error})\n" + "\n".join(map(_tail, logs)))


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return f"({path} unreadable)"


def _runtime_env_file(out_dir: str) -> str:
    """The shipped ``cluster_configs/runtime_env.yaml`` minus ``pip`` (this test has no package index).

    So the job runs the way the README submits it, with the shipped ``env_vars`` applied to the driver
    and the rank actors; its ``pip`` part is checked in ``tests/test_cluster_configs.py``.
    """
    with open(os.path.join(REPO, "cluster_configs", "runtime_env.yaml"), encoding="utf-8") as f:
        runtime_env = yaml.safe_load(f)
    runtime_env.pop("pip", None)
    path = os.path.join(out_dir, "runtime_env.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(runtime_env, f)
    return path


@pytest.mark.timeout(360)
def test_ray_job_submit_meshload_load(tmp_path):
    t0 = time.monotonic()
    model = checkpoints.llama(str(tmp_path / "llama"), tied=True)
    # Short and private: Ray puts unix sockets under it (108-byte path limit) and our nodes' logs.
    temp_dir = tempfile.mkdtemp(prefix="mljob-", dir="/tmp")
    env = _env()
    gcs_port, dashboard_port = _free_port(HEAD_IP), _free_port(HEAD_IP)
    dashboard = f"http://{HEAD_IP}:{dashboard_port}"
    head_log, worker_log = os.path.join(temp_dir, "head.log"), os.path.join(temp_dir, "worker.log")
    common = ["--num-cpus=2", "--object-store-memory=100000000", "--block"]
    procs: list[subprocess.Popen] = []
    submission_id = f"meshload-test-{uuid.uuid4().hex[:8]}"
    client = None
    status = None
    try:
        with open(head_log, "w") as log:
            procs.append(subprocess.Popen(
                [os.path.join(BIN, "ray"), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs_port}",
                 f"--dashboard-host={HEAD_IP}", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
                 f"--ray-client-server-port={_free_port(HEAD_IP)}", f"--system-config={HEAD_SYSTEM_CONFIG}",
                 *_node_ports(HEAD_IP), *common],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
        with open(worker_log, "w") as log:
            procs.insert(0, subprocess.Popen(  # stopped first: the head goes last
                [os.path.join(BIN, "ray"), "start", f"--address={HEAD_IP}:{gcs_port}", f"--node-ip-address={WORKER_IP}",
                 *_node_ports(WORKER_IP), *common],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
        _wait_for_nodes(dashboard, 2, procs, [worker_log, head_log])
        t_up = time.monotonic() - t0

        submit = subprocess.run(
            [os.path.join(BIN, "ray"), "job", "submit", "--address", dashboard, "--submission-id", submission_id,
             "--runtime-env", _runtime_env_file(str(tmp_path)), "--no-wait", "--",
             "meshload", "load", model, "--tp", "2", "--nodes", "2"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr

        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(dashboard)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (status := str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]) not in TERMINAL:
            assert time.monotonic() < deadline, f"job still {status} after {JOB_TIMEOUT_S}s:\n{client.get_job_logs(submission_id)[-4000:]}"
            time.sleep(0.5)
        t_job = time.monotonic() - t0

        logs = subprocess.run(
            [os.path.join(BIN, "ray"), "job", "logs", "--address", dashboard, submission_id],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert logs.returncode == 0, logs.stderr
        text = logs.stdout
        assert status == "SUCCEEDED", f"job {status}:\n{text[-4000:]}"

        # The per-rank report: a header and one row per rank.
        assert re.search(r"rank\s+node\s+node ip\s+stage\s+tp\s+seconds\s+read\s+params\s+read/params", text), text
        rows = {
            int(m.group(1)): (int(m.group(2)), m.group(3))
            for m in re.finditer(r"^\s*(\d+)\s+(\d+)\s+(127\.0\.0\.\d+)\s+0\s+\d+\s", text, re.M)
        }
        # Plan node k is whichever Ray node got placement bundle k: the two ranks on the two IPs, either way.
        assert {rank: node for rank, (node, _) in rows.items()} == {0: 0, 1: 1}, text
        assert sorted(ip for _, ip in rows.values()) == sorted([HEAD_IP, WORKER_IP]), text
        # The plain progress lines, per node, complete.
        for node in (0, 1):
            assert re.search(
                rf"^meshload: node {node} \[ranks {node}\] read [\d.]+ \w+ / [\d.]+ \w+ \(100%\), \d+ files, ", text, re.M
            ), text
        print(f"\ncluster up {t_up:.1f}s, job done {t_job:.1f}s after start")
    finally:
        if client is not None and status not in TERMINAL:
            try:
                client.stop_job(submission_id)
            except Exception:  # noqa: BLE001 - the cluster goes down next anyway
                pass
        leftover = _stop(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert all(p.returncode is not None for p in procs)
    assert not leftover, f"processes of our cluster outlived their node by 10 s (killed): {leftover}"
