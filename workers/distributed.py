"""torch.distributed among the rank actors: one world, one TP group per pipeline stage.

Rank 0 picks a free port on its own node IP; the driver passes that address to every rank. gloo on
CPU, NCCL on CUDA, both with a timeout so a dead peer is an error, not a hang. Pipeline stages do
not use collectives (activations travel as Ray object refs), so with tp == 1 no process group is
needed at all.

Runs on every rank.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch.distributed as dist

from planning.plan import LoadPlan


def free_port(ip: str) -> int:
    """A port free right now on ``ip`` (the caller's node address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def init_world(
    plan: LoadPlan, rank: int, *, master_addr: str, master_port: int, backend: str, timeout_s: float,
    socket_ifname: str | None = None,
):
    """Join the world and return this rank's TP group (None when tp == 1)."""
    if plan.tp == 1:
        return None
    if socket_ifname:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", socket_ifname)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", socket_ifname)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=plan.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    mine = None
    for stage in range(plan.pp):
        members = [r.rank for r in plan.ranks if r.stage == stage]
        group = dist.new_group(ranks=members, backend=backend) if plan.pp > 1 else dist.group.WORLD
        if rank in members:
            mine = group
    return mine


def leave_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
