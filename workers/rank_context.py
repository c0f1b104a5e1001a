"""``RankContext``: what a user's function run on a rank (``LoadedModel.run``) gets to work with.

A loaded model is the way to the shards: a serving loop, an evaluation or an engine of one's own runs
``fn(ctx, ...)`` on every rank (as Ray Train's ``WorkerGroup.execute`` runs a function on each worker)
and finds there the rank's transformers module (its TP collectives installed, so a forward of every
rank of a stage together is the stage's forward), its local tensors by model name, its coordinates in
the tensor-/pipeline-parallel grid, its device and its process groups.

Built on the rank for each call, from the worker's state; runs on every rank (inside the Ray actor).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from planning.plan import RankPlan


@dataclass(frozen=True, slots=True)
class RankContext:
    """One rank, as a user's function sees it.

    ``params``: this rank's own tensors (parameters and persistent buffers of its stage, TP shards at
    their local shape, padding rows included), by transformers' names; read-only mapping, live tensors
    (the very storage the module computes with). ``rank_plan``: how each of them was cut (shards,
    reads). ``tp_group``: the torch.distributed group of the rank's stage (None when ``tp == 1``: no
    process group exists then); ``world_group``: every rank (None when ``tp == 1``).
    """

    rank: int
    world_size: int
    tp: int
    tp_rank: int
    pp: int
    stage: int
    first_stage: bool
    last_stage: bool
    node: int  # the plan's node index (``LoadedModel.report[rank].node_ip`` says which machine)
    device: torch.device
    module: torch.nn.Module
    params: Mapping[str, torch.Tensor]
    rank_plan: RankPlan
    tp_group: object | None = None
    world_group: object | None = None

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The rank's own parameters (not buffers), as ``(name, tensor)`` in plan order."""
        return [(p.name, self.params[p.name]) for p in self.rank_plan.params if not p.is_buffer and p.name in self.params]
