"""What each rank reports about its load: the contract fields of ``LoadedModel.report``.

Runs on every rank; the driver collects one ``RankReport`` per rank.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class RankReport:
    rank: int
    node_id: str  # Ray node id of the node the rank ran on ("" outside Ray)
    seconds: float  # from the start of the rank's load to ready
    bytes_read: int  # checkpoint bytes this rank read from files
    param_bytes: int  # bytes of parameter storage the rank holds
    bytes_fetched: int  # bytes this rank downloaded (Hub fetches; 0 for local checkpoints)
    peak_rss_bytes: int  # the rank process's peak resident memory (VmHWM)
    node: int = 0  # node index in the plan
    stage: int = 0
    tp_rank: int = 0
    node_ip: str = ""
    peak_device_bytes: int = 0  # peak CUDA memory allocated (0 on CPU)
    restarts: int = 0  # times the driver restarted this rank's actor during the load
    disk_read_bytes: int = 0  # bytes the rank's process fetched from storage while reading (0: all from page cache)
    read_seconds: float = 0.0  # of ``seconds``: reading the planned ranges
    build_seconds: float = 0.0  # of ``seconds``: building the local model (and buffers), waiting for the skeleton included
    import_seconds: float = 0.0  # importing transformers' model code, on a background thread of the rank
    skeleton_seconds: float = 0.0  # building the meta-device model from the plan, on the same thread
    process_seconds: float = 0.0  # the rank process's age at ready: its start and imports included
    weights_ready_at: float = 0.0  # wall clock (epoch seconds) when the rank's last read landed on its device

    def as_dict(self) -> dict:
        return asdict(self)


def node_location() -> dict:
    """Where this process runs: Ray node id and IP (empty outside Ray), host name, pid."""
    node_id, ip = "", ""
    ray = sys.modules.get("ray")  # never imported here: a rank outside Ray has no node to name
    if ray is not None and ray.is_initialized():
        node_id = ray.get_runtime_context().get_node_id()
        ip = ray.util.get_node_ip_address()
    return {"node_id": node_id, "node_ip": ip, "host": socket.gethostname(), "pid": os.getpid()}


def process_age_s() -> float:
    """Seconds since this process started (from /proc, so the interpreter's start-up counts); 0 elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except OSError:
        return 0.0
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def io_counters() -> dict[str, int]:
    """This process's ``rchar`` (bytes returned by read calls) and ``read_bytes`` (fetched from storage)."""
    out = {}
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("rchar", "read_bytes"):
                    out[key] = int(value)
    except OSError:
        pass
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux ``VmHWM``), in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
