"""The validation pass over a ``LoadPlan``: the invariants every rank relies on.

- Per rank and parameter: destination boxes tile the held (non-padding) part of the local tensor
  exactly once; every source box lies inside its tensor and every byte inside its file.
- Across ranks: each stage's TP group covers every element of every sharded parameter the same
  number of times (once, or ``tp // num_kv_heads`` times for replicated KV heads); every model tensor
  is held by every rank of exactly one stage (plus tie copies).
- Ties: every ``receive_from`` has a matching send; every ``alias_of`` names a parameter of the rank.
- Offload (``planning.offload``): only tensors of the repeated layers are off the device, in a known tier;
  an alias lives where its owner does; a tensor another stage sends stays on the device.
- Budgets respected (the device's including room to stream two offloaded layers; host memory's); every node fetches every byte its ranks read, and only files of the plan.
- Names: the checkpoint's location (an absolute folder; for a remote checkpoint, a reference and a pinned
  version of 40 hex digits, whose grammar — a Hub repo id, an S3 bucket — its source checks where it
  turns them into paths), every file name (plain relative paths), every sha256 — as
  ``planning.confinement`` allows them. Whether the files are those of the checkpoint on disk is
  ``planning.plan_check``'s part.

Failures are bugs in planning (or a tampered plan file), reported as ``PlanError`` with the rank and
tensor. Pure; runs on the driver after ``planning.build.build_plan`` and after reading a plan from JSON, and on every
node that executes a plan (its fetcher).
"""

from __future__ import annotations

import math
import os

from planning.boxes import Box, box_numel, in_bounds, replace_dim
from planning.confinement import check_commit, check_git_sha1, check_relative_name, check_sha256
from planning.errors import CheckpointError, PlanError
from planning.offload import TIERS, stream_bytes, tier_bytes
from planning.pipeline import layer_of
from planning.plan import LoadPlan, ParamPlan, RankPlan
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE
from planning.source_expr import Fragment, covers


def _held_box(param: ParamPlan) -> Box:
    box = tuple((0, n) for n in param.shape)
    if param.shard is not None:
        held = sum(length for _, length in param.shard.pieces)
        box = replace_dim(box, param.shard.dim, (0, held))
    return box


def validate_plan(plan: LoadPlan) -> None:
    validate_names(plan)
    files = {f.name: f for f in plan.files}
    if len(plan.ranks) != plan.tp * plan.pp:
        raise PlanError(f"plan has {len(plan.ranks)} ranks, expected tp×pp = {plan.tp}×{plan.pp}")
    if len(plan.budgets) != len(plan.ranks) or len(plan.cpu_budgets) not in (0, len(plan.ranks)):
        raise PlanError(f"plan has {len(plan.budgets)} device and {len(plan.cpu_budgets)} cpu budgets for {len(plan.ranks)} ranks")
    for r in plan.ranks:
        _validate_rank(r, files)
        _validate_offload(plan, r)
    _validate_ties(plan)
    _validate_coverage(plan)
    _validate_fetch(plan)


def validate_names(plan: LoadPlan) -> None:
    """Every name and hash in ``plan`` that ends up in a path, checked against ``planning.confinement``."""
    m = plan.model
    try:
        if not isinstance(m.kind, str) or not m.kind.isidentifier():
            raise PlanError(f"plan: checkpoint kind {m.kind!r} is not a source's name")
        if m.remote:  # fetched into each node's cache, under names its source derives from the reference
            if not isinstance(m.source, str) or not m.source or not m.source.isprintable():
                raise PlanError(f"plan: {m.kind} checkpoint reference {m.source!r} is empty or not printable")
            check_commit(m.revision, where=f"plan of {m.source}")  # the pinned version: a commit or a fingerprint
        elif not isinstance(m.root, str) or not os.path.isabs(m.root) or os.path.normpath(m.root) != m.root:
            raise PlanError(f"plan of {m.source!r}: checkpoint folder {m.root!r} is not a normalized absolute path")
        if m.checkpoint_format not in ("safetensors", "pickle"):
            raise PlanError(f"plan: checkpoint format {m.checkpoint_format!r}, expected 'safetensors' or 'pickle'")
        seen = set()
        for f in plan.files:
            check_relative_name(f.name, where="plan")
            check_sha256(f.sha256, where=f"plan, {f.name}")
            check_sha256(f.header_sha256, where=f"plan, {f.name} (header)")
            check_git_sha1(f.git_sha1, where=f"plan, {f.name}")
            if f.name in seen:
                raise PlanError(f"plan lists file {f.name} twice")
            seen.add(f.name)
            if not 0 <= f.header_size <= f.size:
                raise PlanError(f"plan, {f.name}: header of {f.header_size} bytes in a file of {f.size}")
    except CheckpointError as exc:
        raise PlanError(str(exc)) from None
    sizes = {f.name: f.size for f in plan.files}
    for node in plan.nodes:
        for ff in node.fetch:
            if ff.file not in sizes:
                raise PlanError(f"node {node.node} fetches {ff.file!r}, which is not a file of the checkpoint")
            if any(not 0 <= a <= b <= sizes[ff.file] for a, b in ff.ranges):
                raise PlanError(f"node {node.node} fetches bytes outside {ff.file} ({sizes[ff.file]} bytes): {ff.ranges}")


def _validate_rank(r, files) -> None:
    names = {p.name for p in r.params}
    for p in r.params:
        where = f"rank {r.rank}, {p.name}"
        if p.shard is not None and p.shard.local_shape(p.full_shape) != p.shape:
            raise PlanError(f"{where}: local shape {p.shape} disagrees with its shard {p.shard}")
        sources = (p.alias_of is not None) + (p.receive_from is not None) + p.computed + bool(p.reads)
        if sources != 1 and not (sources == 0 and box_numel(_held_box(p)) == 0):
            raise PlanError(f"{where}: must be filled by exactly one of reads, alias, receive or compute")
        if p.alias_of is not None and p.alias_of not in names:
            raise PlanError(f"{where}: aliases {p.alias_of!r}, which this rank does not hold")
        for item in p.reads:
            if not in_bounds(item.src_box, item.src_shape):
                raise PlanError(f"{where}: source box {item.src_box} outside {item.tensor} of shape {item.src_shape}")
            if not in_bounds(item.dst_box, p.shape):
                raise PlanError(f"{where}: destination box {item.dst_box} outside local shape {p.shape}")
            if box_numel(item.src_box) != box_numel(item.dst_box):
                raise PlanError(f"{where}: source box {item.src_box} and destination {item.dst_box} differ in size")
            f = files.get(item.file)
            if f is None:
                raise PlanError(f"{where}: reads {item.file}, which is not a file of the checkpoint")
            end = item.file_offset + math.prod(item.src_shape) * TORCH_DTYPE_ITEMSIZE[item.src_dtype]
            if item.file_offset < f.header_size or end > f.size:
                raise PlanError(f"{where}: {item.tensor} spans bytes {item.file_offset}-{end} outside the data of {item.file} ({f.size} bytes)")
        if p.reads:
            frags = [Fragment(i.tensor, i.src_box, i.dst_box, i.axes) for i in p.reads]
            if not covers(_held_box(p), frags):
                raise PlanError(f"{where}: reads do not cover the local tensor exactly once")


def _validate_offload(plan: LoadPlan, r: RankPlan) -> None:
    held = {p.name: p for p in r.params}
    for p in r.params:
        if p.offload is None:
            continue
        where = f"rank {r.rank}, {p.name}"
        if p.offload not in TIERS:
            raise PlanError(f"{where}: offload {p.offload!r}, expected one of {TIERS} or none (the device)")
        if layer_of(p.name, plan.layers_path) is None:
            raise PlanError(f"{where}: offloaded to {p.offload!r} but not a tensor of the layers of {plan.layers_path}")
        if p.receive_from is not None:
            raise PlanError(f"{where}: received from rank {p.receive_from}, so it cannot be offloaded")
    for p in r.params:
        if p.alias_of is not None and p.alias_of in held and held[p.alias_of].offload != p.offload:
            raise PlanError(f"rank {r.rank}, {p.name}: offload {p.offload!r}, but the tensor it aliases is on {held[p.alias_of].offload!r}")
    device, streamed = tier_bytes(r, None), stream_bytes(r, plan.layers_path)
    budget = plan.budgets[r.rank]
    if budget is not None and device + streamed > budget:
        raise PlanError(f"rank {r.rank}: {device} bytes of parameters on its device plus {streamed} to stream offloaded "
                        f"layers exceed its budget of {budget}")
    cpu_budget = plan.cpu_budgets[r.rank] if plan.cpu_budgets else None
    if cpu_budget is not None and tier_bytes(r, "cpu") > cpu_budget:
        raise PlanError(f"rank {r.rank}: {tier_bytes(r, 'cpu')} bytes offloaded to host memory exceed its cpu budget of {cpu_budget}")


def _validate_ties(plan: LoadPlan) -> None:
    sends = {(s.to_rank, s.as_name): (r.rank, s.name) for r in plan.ranks for s in r.sends}
    for r in plan.ranks:
        held = {p.name: p for p in r.params}
        for s in r.sends:
            if s.name not in held or held[s.name].alias_of is not None and held[s.name].alias_of not in held:
                raise PlanError(f"rank {r.rank} sends {s.name!r}, which it does not hold")
        for p in r.params:
            if p.receive_from is not None and sends.get((r.rank, p.name), (None,))[0] != p.receive_from:
                raise PlanError(f"rank {r.rank}, {p.name}: expects it from rank {p.receive_from}, which sends no such tensor")


def _validate_coverage(plan: LoadPlan) -> None:
    by_stage: dict[int, list] = {}
    for r in plan.ranks:
        by_stage.setdefault(r.stage, []).append(r)
    holders: dict[str, set[int]] = {}
    for stage, members in by_stage.items():
        names = [p.name for p in members[0].params]
        for m in members:
            if [p.name for p in m.params] != names:
                raise PlanError(f"ranks of stage {stage} hold different tensors ({members[0].rank} vs {m.rank})")
        for name in names:
            holders.setdefault(name, set()).add(stage)
        for i, name in enumerate(names):
            params = [m.params[i] for m in members]
            shards = [p.shard for p in params]
            if all(s is None for s in shards):
                continue
            if any(s is None for s in shards) or len({(s.dim, s.full_size) for s in shards}) != 1:
                raise PlanError(f"stage {stage}, {name}: ranks disagree on how it is sharded")
            _check_pieces(name, stage, [s.pieces for s in shards], shards[0].full_size)
    all_names = {p.name for r in plan.ranks for p in r.params}
    for name in all_names:
        if not holders.get(name):
            raise PlanError(f"{name} is held by no stage")


def _check_pieces(name: str, stage: int, pieces_per_rank, full_size: int) -> None:
    """Every element along the split dimension is covered the same (non-zero) number of times."""
    events: dict[int, int] = {}
    for pieces in pieces_per_rank:
        for start, length in pieces:
            if length:
                events[start] = events.get(start, 0) + 1
                events[start + length] = events.get(start + length, 0) - 1
    depth, prev, multiplicity = 0, 0, None
    for pos in sorted(events):
        if pos > prev:
            if multiplicity is None:
                multiplicity = depth
            if depth != multiplicity or depth == 0:
                raise PlanError(f"stage {stage}, {name}: elements [{prev}, {pos}) covered {depth} time(s), others {multiplicity}")
        depth += events[pos]
        prev = pos
    if full_size and (min(events, default=0) != 0 or prev != full_size):
        raise PlanError(f"stage {stage}, {name}: the TP pieces do not span [0, {full_size})")


def _validate_fetch(plan: LoadPlan) -> None:
    for node in plan.nodes:
        ranges = {f.file: f.ranges for f in node.fetch}
        for rank in node.ranks:
            for p in plan.ranks[rank].params:
                for item in p.reads:
                    a, b = item.byte_span
                    if not any(s <= a and b <= e for s, e in ranges.get(item.file, ())):
                        raise PlanError(f"node {node.node} does not fetch bytes {a}-{b} of {item.file} that rank {rank} reads")
        if any(plan.ranks[r].node != node.node for r in node.ranks):
            raise PlanError(f"node {node.node} lists a rank placed elsewhere")
