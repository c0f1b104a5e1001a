"""torch.distributed among the rank actors: one world, one TP group per pipeline stage.

Rank 0 serves the rendezvous store (``listen_store``): a ``TCPStore`` on a socket bound to its node's
cluster address only — not every interface — whose port the OS picks as it binds, so no other process
can take the port between a pick and a bind. The driver passes that address to every rank, which joins
as a client. gloo on CPU, NCCL on CUDA, both with a timeout so a dead peer is an error, not a hang.
Pipeline stages do not use collectives (activations travel as Ray object refs), so with tp == 1 no
process group is needed at all.

Runs on every rank.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch.distributed as dist

from planning.plan import LoadPlan

STORE_TIMEOUT_S = 600.0  # until init_world sets the load's own


def listen_store(ip: str, world_size: int) -> tuple[dist.TCPStore, int]:
    """Rank 0's rendezvous store, listening on ``ip`` (this node's cluster address) alone; and its port."""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((ip, 0))
        sock.listen(max(128, world_size))
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()  # the store owns the listening socket from now on
    try:
        store = dist.TCPStore(
            ip, port, world_size, True, timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S),
            wait_for_workers=False, master_listen_fd=fd,
        )
    except BaseException:
        os.close(fd)
        raise
    return store, port


def init_world(
    plan: LoadPlan, rank: int, *, master_addr: str, master_port: int, backend: str, timeout_s: float,
    socket_ifname: str | None = None, store: dist.Store | None = None,
):
    """Join the world and return this rank's TP group (None when tp == 1). ``store``: rank 0's own
    (``listen_store``); other ranks connect to ``master_addr:master_port``."""
    if plan.tp == 1:
        return None
    if socket_ifname:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", socket_ifname)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", socket_ifname)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(master_addr, master_port, plan.world_size, False, timeout=timeout)
        else:
            store.set_timeout(timeout)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=plan.world_size, timeout=timeout)
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
