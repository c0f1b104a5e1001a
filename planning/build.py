"""Build the load plan: a pure function of the checkpoint index, the meta model, the converters and the topology.

``build_plan`` combines ``PlanInputs`` (assembled by ``planning.planner``) into the frozen types of
``planning.plan`` — every rank's parameters with their shards and the exact byte ranges to read, each
node's merged fetch ranges, the totals — and checks the result with ``planning.validate`` (every
element of every parameter covered exactly once on each rank that holds it, every range in bounds,
every budget respected) before returning it.

Runs on the driver, for all ranks in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from planning.boxes import Box, full_box, translate
from planning.byte_ranges import merge_ranges
from planning.checkpoint_index import CheckpointIndex
from planning.conversions import SourceMap
from planning.errors import PlanError
from planning.offload import RankBudget, place_rank
from planning.pipeline import StageLayout
from planning.plan import FileFetch, LoadPlan, ModelRef, NodePlan, ParamPlan, PlanTotals, RankPlan, ReadItem, StagePlan, TieSend
from planning.quantization import Quantization, block_shard, scale_owner
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE
from planning.shard import Shard
from planning.skeleton import Skeleton, TensorSpec
from planning.source_expr import Expr, locate
from planning.tp_plans import PlanMatcher
from planning.tp_styles import shard_for
from planning.validate import validate_plan

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def node_blocks(world_size: int, num_nodes: int) -> list[int]:
    """Node of every rank: contiguous blocks, as even as possible."""
    if num_nodes < 1:
        raise PlanError(f"nodes={num_nodes}: need at least one node")
    if world_size < num_nodes:
        raise PlanError(
            f"nodes={num_nodes} but only {world_size} rank(s) (tp × pp): every node needs at least one rank"
        )
    base, extra = divmod(world_size, num_nodes)
    out = []
    for node in range(num_nodes):
        out += [node] * (base + (1 if node < extra else 0))
    return out


def _flops_per_token(skeleton: Skeleton, config: PretrainedConfig) -> int:
    text = config.get_text_config()
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    top_k = getattr(text, "num_experts_per_tok", None)
    total = 0
    for t in skeleton.tensors:
        if t.is_buffer or t.module_type == "Embedding":
            continue
        n = t.numel
        if experts and top_k and ".experts." in f".{t.name}" and len(t.shape) == 3 and t.shape[0] == experts:
            n = n * top_k // experts
        total += n
    return 2 * total


def _item(index: CheckpointIndex, tensor: str, src_box: Box, dst_box: Box, axes: tuple[int | None, ...]) -> ReadItem:
    entry = index.tensors[tensor]
    return ReadItem(
        tensor=tensor,
        file=entry.file,
        file_offset=entry.start,
        src_shape=entry.shape,
        src_dtype=entry.dtype,
        src_box=src_box,
        dst_box=dst_box,
        axes=tuple(axes),
    )


def _reads(expr: Expr, shard: Shard | None, full_shape: tuple[int, ...], index: CheckpointIndex) -> tuple[ReadItem, ...]:
    pieces = shard.piece_boxes(full_shape) if shard is not None else [(full_box(full_shape), full_box(full_shape))]
    items = []
    for local_box, full in pieces:
        origin = tuple(s for s, _ in local_box)
        for f in locate(expr, full):
            items.append(_item(index, f.tensor, f.src_box, translate(f.dst_box, origin, sign=+1), f.axes))
    return tuple(items)


@dataclass(frozen=True)
class PlanInputs:
    """Everything ``build_plan`` combines; assembled by ``planning.planner``."""

    model_ref: ModelRef
    config: PretrainedConfig
    skeleton: Skeleton
    index: CheckpointIndex
    sources: SourceMap
    stages: StageLayout
    tp_plan: dict[str, str]
    tp: int
    pp: int
    num_nodes: int
    dtype: str
    device: str
    attn_implementation: str
    budgets: list[RankBudget]
    quantization: Quantization | None = None
    offload_tiers: dict[str, str | None] = field(default_factory=dict)  # device_map prefix → "cpu"/"disk"/None (device)


def build_plan(inp: PlanInputs) -> LoadPlan:
    """Plan every rank (see module docstring)."""
    skeleton, index, sources = inp.skeleton, inp.index, inp.sources
    tp, pp = inp.tp, inp.pp
    world = tp * pp
    nodes_of = node_blocks(world, inp.num_nodes)
    matcher = PlanMatcher(inp.tp_plan)
    matches = {t.name: matcher.match(t) for t in skeleton.tensors}
    stage_of = inp.stages.stage_of

    def shard_of(spec: TensorSpec, tp_rank: int) -> tuple[str | None, Shard | None]:
        m = matches[spec.name]
        if m is None:
            return None, None
        weight = scale_owner(spec.name, inp.quantization)
        if weight is not None and weight in skeleton.by_name and len(spec.shape) >= 2:
            # Block scales are cut where their weight is cut, a block per scale (refused off the block boundaries).
            weight_spec = skeleton.by_name[weight]
            _, weight_shard = shard_of(weight_spec, tp_rank)
            shard = block_shard(weight_shard, weight_name=weight, ndim=len(weight_spec.shape),
                                block=inp.quantization.block, scale_size=spec.shape[weight_shard.dim] if weight_shard else 0,
                                tp=tp)
            return m.style, shard
        shard = shard_for(spec, m.style, param_level=m.param_level, tp=tp, tp_rank=tp_rank, heads=skeleton.heads, where=m.key)
        return m.style, shard

    # Tied parameter → the parameter that holds its value; where each lives.
    owner_of = dict(sources.aliases)
    computed = set(sources.computed)
    rank_params: list[list[ParamPlan]] = [[] for _ in range(world)]
    sends: list[list[TieSend]] = [[] for _ in range(world)]
    for spec in skeleton.tensors:
        stage = stage_of[spec.name]
        for tp_rank in range(tp):
            rank = stage * tp + tp_rank
            style, shard = shard_of(spec, tp_rank)
            local = shard.local_shape(spec.shape) if shard else spec.shape
            common = dict(name=spec.name, shape=local, full_shape=spec.shape, dtype=spec.dtype, style=style,
                          shard=shard, is_buffer=spec.is_buffer)
            if spec.name in computed:
                rank_params[rank].append(ParamPlan(**common, computed=True))
                continue
            owner = owner_of.get(spec.name)
            if owner is not None:
                owner_spec = skeleton.by_name[owner]
                owner_stage = stage_of[owner]
                _, owner_shard = shard_of(owner_spec, tp_rank)
                same_layout = owner_shard == shard and owner_spec.dtype == spec.dtype
                if owner in computed and owner_stage != stage:
                    raise PlanError(
                        f"{spec.name!r} is tied to {owner!r}; the checkpoint holds neither and they are on stages "
                        f"{owner_stage} and {stage}, so one initialised value cannot be shared; add the tensor to the "
                        f"checkpoint or pass a device_map that keeps both on one stage"
                    )
                if owner in computed and not same_layout:  # initialised on this rank from the owner's full value
                    rank_params[rank].append(ParamPlan(**common, computed=True, tied_to=owner))
                    continue
                if same_layout:
                    if owner_stage == stage:
                        rank_params[rank].append(ParamPlan(**common, alias_of=owner))
                    else:
                        sender = owner_stage * tp + tp_rank
                        rank_params[rank].append(ParamPlan(**common, receive_from=sender))
                        sends[sender].append(TieSend(name=owner, to_rank=rank, as_name=spec.name))
                    continue
                expr = sources.exprs[owner]  # differently sharded tie: read the same checkpoint tensor again
            else:
                expr = sources.exprs[spec.name]
            rank_params[rank].append(ParamPlan(**common, reads=_reads(expr, shard, spec.shape, index)))

    ranks = tuple(
        place_rank(
            RankPlan(rank=r, node=nodes_of[r], stage=r // tp, tp_rank=r % tp, params=tuple(rank_params[r]),
                     sends=tuple(sends[r])),
            budget=inp.budgets[r], tiers=inp.offload_tiers, layers_path=skeleton.layers_path,
        )
        for r in range(world)
    )
    stages = tuple(
        StagePlan(stage=s, layer_start=a, layer_stop=b, first=s == 0, last=s == pp - 1)
        for s, (a, b) in enumerate(inp.stages.layer_ranges)
    )
    totals = PlanTotals(
        num_parameters=sum(t.numel for t in skeleton.tensors if not t.is_buffer and t.name not in sources.aliases),
        param_bytes=sum(
            t.numel * TORCH_DTYPE_ITEMSIZE[t.dtype] for t in skeleton.tensors if t.name not in sources.aliases
        ),
        checkpoint_bytes=index.total_bytes,
        flops_per_token=_flops_per_token(skeleton, inp.config),
    )
    plan = LoadPlan(
        model=inp.model_ref,
        dtype=inp.dtype,
        device=inp.device,
        attn_implementation=inp.attn_implementation,
        tp=tp,
        pp=pp,
        num_nodes=inp.num_nodes,
        stages=stages,
        ranks=ranks,
        nodes=node_plans(ranks, inp.num_nodes, index),
        files=index.files,
        tp_plan=dict(inp.tp_plan),
        heads=skeleton.heads,
        totals=totals,
        budgets=tuple(b.device for b in inp.budgets),
        cpu_budgets=tuple(b.cpu for b in inp.budgets),
        layers_path=skeleton.layers_path,
        keys=sources.keys,
        quantization=inp.quantization,
    )
    validate_plan(plan)
    return plan


def node_plans(ranks: tuple[RankPlan, ...], num_nodes: int, index: CheckpointIndex) -> tuple[NodePlan, ...]:
    """What each node fetches: the merged byte ranges (headers included) its ranks read, per file."""
    out = []
    for node in range(num_nodes):
        members = [r for r in ranks if r.node == node]
        spans: dict[str, list[tuple[int, int]]] = {}
        for r in members:
            for p in r.params:
                for item in p.reads:
                    spans.setdefault(item.file, []).append(item.byte_span)
        fetch = []
        for fname in sorted(spans):
            header = index.file(fname).header_size
            fetch.append(FileFetch(file=fname, ranges=tuple(merge_ranges([(0, header), *spans[fname]]))))
        out.append(NodePlan(node=node, ranks=tuple(r.rank for r in members), fetch=tuple(fetch)))
    return tuple(out)

