"""Reassemble full tensors from the ranks' local shards (``LoadedModel.full_state_dict``).

The inverse of sharding: for every tensor, the first stage that holds it provides it; a sharded
tensor is stitched from its TP ranks' pieces along the split dimension, padding dropped, and a
replicated KV head is taken once. Keys come out in the order of transformers' ``state_dict``.

Pure torch; runs on the driver.
"""

from __future__ import annotations

import torch

from planning.plan import LoadPlan
from workers.wire import from_wire


def assemble_state_dict(plan: LoadPlan, local_states: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for stage in plan.stages:
        members = [r for r in plan.ranks if r.stage == stage.stage]
        for i, p in enumerate(members[0].params):
            if p.name in out or p.name not in local_states[members[0].rank]:  # (scales consumed by a dequantization)
                continue
            if p.shard is None:
                out[p.name] = from_wire(local_states[members[0].rank][p.name], p.dtype)
                continue
            first = from_wire(local_states[members[0].rank][p.name], p.dtype)
            full = torch.empty(p.full_shape, dtype=first.dtype)
            for m in members:
                mp = m.params[i]
                local = from_wire(local_states[m.rank][p.name], p.dtype)
                at = 0
                for start, length in mp.shard.pieces:
                    full.narrow(mp.shard.dim, start, length).copy_(local.narrow(mp.shard.dim, at, length))
                    at += length
            out[p.name] = full
    return out
