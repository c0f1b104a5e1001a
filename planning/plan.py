"""The load plan: for every rank, each parameter's local shape and the exact source byte ranges to read.

``build_plan`` is a pure function of the checkpoint index, the meta model, the converters and the
topology (``tp``, ``pp``, ``nodes``, budgets). Its output is frozen dataclasses that round-trip through
JSON (``planning.plan_json``) and pass ``planning.validate`` — every element of every parameter covered
exactly once on each rank that holds it, every range in bounds, every budget respected.

Rank layout: ``rank = stage * tp + tp_rank`` (a stage's TP group is consecutive ranks), and ranks go
to nodes in contiguous blocks, so a TP group shares a node whenever the node is big enough.

Tied parameters: on one rank a tied pair with the same shard is one tensor (``alias_of``); across
pipeline stages (embedding on the first, LM head on the last) the owner stage reads it and sends it to
the other (``receive_from``/``sends``): read once, not twice.

Runs on the driver, for all ranks in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from planning.boxes import Box, box_numel, byte_span, full_box, translate
from planning.byte_ranges import merge_ranges
from planning.checkpoint import CheckpointFile, CheckpointIndex
from planning.conversions import SourceMap
from planning.errors import PlanError
from planning.key_report import KeyReport
from planning.offload import RankBudget, place_rank
from planning.pipeline import StageLayout
from planning.quantization import Quantization, block_shard, scale_owner
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE
from planning.skeleton import HeadLayout, Skeleton, TensorSpec
from planning.source_expr import locate
from planning.tp_plans import PlanMatcher
from planning.tp_styles import Shard, shard_for

PLAN_FORMAT_VERSION = 2  # 2: files carry header_sha256


@dataclass(frozen=True, slots=True)
class ReadItem:
    """Read ``src_box`` of checkpoint tensor ``tensor`` into ``dst_box`` of the local parameter.

    ``axes[i]`` is the source dimension feeding destination dimension ``i`` (None: a size-1 dim the
    source lacks); non-increasing order means a transpose, which needs a staging copy.
    """

    tensor: str
    file: str
    file_offset: int  # byte offset of the tensor's first element in ``file``
    src_shape: tuple[int, ...]
    src_dtype: str
    src_box: Box
    dst_box: Box
    axes: tuple[int | None, ...]

    @property
    def nbytes(self) -> int:
        return box_numel(self.src_box) * TORCH_DTYPE_ITEMSIZE[self.src_dtype]

    @property
    def byte_span(self) -> tuple[int, int]:
        """The smallest file range containing every byte this item reads."""
        return byte_span(self.src_shape, self.src_box, itemsize=TORCH_DTYPE_ITEMSIZE[self.src_dtype], offset=self.file_offset)


@dataclass(frozen=True, slots=True)
class ParamPlan:
    """One tensor of the model on one rank."""

    name: str
    shape: tuple[int, ...]  # local shape
    full_shape: tuple[int, ...]
    dtype: str
    style: str | None = None
    shard: Shard | None = None
    reads: tuple[ReadItem, ...] = ()
    alias_of: str | None = None  # the same tensor as this other parameter of the rank (tie)
    receive_from: int | None = None  # rank that sends this tensor (tie across stages)
    computed: bool = False  # absent from the checkpoint: initialised on the rank, as transformers initialises it
    tied_to: str | None = None  # (computed) tied to this other initialised tensor of the rank, sharded differently
    is_buffer: bool = False
    offload: str | None = None  # None: on the rank's device; "cpu": host memory; "disk": mapped from a file (planning.offload)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * TORCH_DTYPE_ITEMSIZE[self.dtype]

    @property
    def owns_storage(self) -> bool:
        return self.alias_of is None


@dataclass(frozen=True, slots=True)
class TieSend:
    """After loading, send local tensor ``name`` to ``to_rank``, which stores it as ``as_name``."""

    name: str
    to_rank: int
    as_name: str


@dataclass(frozen=True, slots=True)
class RankPlan:
    rank: int
    node: int
    stage: int
    tp_rank: int
    params: tuple[ParamPlan, ...]
    sends: tuple[TieSend, ...] = ()

    @property
    def param_bytes(self) -> int:
        """Bytes of parameter storage this rank holds (tied aliases counted once)."""
        return sum(p.nbytes for p in self.params if p.owns_storage)

    @property
    def read_bytes(self) -> int:
        return sum(r.nbytes for p in self.params for r in p.reads)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted({r.file for p in self.params for r in p.reads}))

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(p.shape) for p in self.params if p.owns_storage and not p.is_buffer)


@dataclass(frozen=True, slots=True)
class FileFetch:
    """What a node needs of one file: merged byte ranges (headers included) and their total."""

    file: str
    ranges: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(b - a for a, b in self.ranges)


@dataclass(frozen=True, slots=True)
class NodePlan:
    node: int
    ranks: tuple[int, ...]
    fetch: tuple[FileFetch, ...]

    @property
    def fetch_bytes(self) -> int:
        return sum(f.nbytes for f in self.fetch)


@dataclass(frozen=True, slots=True)
class StagePlan:
    stage: int
    layer_start: int
    layer_stop: int
    first: bool
    last: bool


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Where the checkpoint and config come from, and how to rebuild the skeleton on a rank."""

    source: str  # what the user passed: a path or a Hub repo id
    kind: str  # "local" or "hub"
    root: str | None  # local checkpoint folder (None for Hub checkpoints: each node resolves its cache)
    revision: str | None
    class_name: str
    model_type: str
    config: dict = field(repr=False)  # config.json content
    checkpoint_format: str = "safetensors"


@dataclass(frozen=True, slots=True)
class PlanTotals:
    num_parameters: int
    param_bytes: int  # one full copy of the model in the load dtype
    checkpoint_bytes: int
    flops_per_token: int  # ≈ 2 × parameters used per token (matmuls; MoE counts active experts)


@dataclass(frozen=True)
class LoadPlan:
    model: ModelRef
    dtype: str
    device: str
    attn_implementation: str
    tp: int
    pp: int
    num_nodes: int
    stages: tuple[StagePlan, ...]
    ranks: tuple[RankPlan, ...]
    nodes: tuple[NodePlan, ...]
    files: tuple[CheckpointFile, ...]
    tp_plan: dict[str, str]
    heads: HeadLayout | None
    totals: PlanTotals
    budgets: tuple[int | None, ...]  # per rank, bytes of parameters on its device (streamed layers included); None = unbounded
    layers_path: str | None = None  # module path of the repeated layers that stages split
    keys: KeyReport = KeyReport()  # checkpoint tensors not loaded, model tensors initialised (transformers' report)
    quantization: Quantization | None = None  # a pre-quantized checkpoint's (planning.quantization)
    cpu_budgets: tuple[int | None, ...] = ()  # per rank, bytes of host memory for offloaded tensors; None/absent = unbounded
    version: int = PLAN_FORMAT_VERSION

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def to_json(self, **kwargs) -> str:
        from planning.plan_json import plan_to_json

        return plan_to_json(self, **kwargs)

    @staticmethod
    def from_json(text: str) -> "LoadPlan":
        from planning.plan_json import plan_from_json

        return plan_from_json(text)


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


def _flops_per_token(skeleton: Skeleton, config) -> int:
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


def _item(index: CheckpointIndex, tensor: str, src_box: Box, dst_box: Box, axes) -> ReadItem:
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


def _reads(expr, shard: Shard | None, full_shape, index: CheckpointIndex) -> tuple[ReadItem, ...]:
    pieces = shard.piece_boxes(full_shape) if shard is not None else [(full_box(full_shape), full_box(full_shape))]
    items = []
    for local_box, full in pieces:
        origin = tuple(s for s, _ in local_box)
        for f in locate(expr, full):
            items.append(_item(index, f.tensor, f.src_box, translate(f.dst_box, origin, sign=+1), f.axes))
    return tuple(items)


@dataclass
class PlanInputs:
    """Everything ``build_plan`` combines; assembled by ``planning.planner.make_plan``."""

    model_ref: ModelRef
    config: object
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
        nodes=_node_plans(ranks, inp.num_nodes, index),
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
    from planning.validate import validate_plan

    validate_plan(plan)
    return plan


def _node_plans(ranks: tuple[RankPlan, ...], num_nodes: int, index: CheckpointIndex) -> tuple[NodePlan, ...]:
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

