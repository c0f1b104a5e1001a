"""The load plan's types: for every rank, each parameter's local shape and the exact byte ranges to read.

These frozen dataclasses are the contract between planning and everything after it (the fetch stage,
the ranks, the report, the plan cache). This module holds only the types: it imports nothing that
builds, checks or encodes a plan, so every such module can import the types and be typed by them —
``planning.build`` makes a plan, ``planning.validate`` checks one, ``planning.plan_json`` round-trips
one through JSON, ``planning.retarget`` re-places one on other nodes.

Rank layout: ``rank = stage * tp + tp_rank`` (a stage's TP group is consecutive ranks), and ranks go
to nodes in contiguous blocks, so a TP group shares a node whenever the node is big enough.

Tied parameters: on one rank a tied pair with the same shard is one tensor (``alias_of``); across
pipeline stages (embedding on the first, LM head on the last) the owner stage reads it and sends it to
the other (``receive_from``/``sends``): read once, not twice.

Pure data; made on the driver, shipped to every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from planning.boxes import Box, box_numel, byte_span
from planning.checkpoint_index import CheckpointFile
from planning.key_report import KeyReport
from planning.quantization import Quantization
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE
from planning.shard import Shard
from planning.skeleton import HeadLayout

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

    source: str  # what the user passed: a path, a Hub repo id, an s3:// prefix
    kind: str  # the source's kind (``workers.sources.SOURCES``): "local", "hub", "s3"
    root: str | None  # local checkpoint folder (None for a remote checkpoint: each node fetches into its cache)
    revision: str | None  # a remote checkpoint's pinned version: a Hub commit, an object-store fingerprint
    class_name: str
    model_type: str
    config: dict = field(repr=False)  # config.json content
    checkpoint_format: str = "safetensors"

    @property
    def remote(self) -> bool:
        """Fetched by each node into its own cache (named by ``source`` and the pinned ``revision``; no ``root``),
        rather than read in place from the folder ``root``. Which a kind is, its source declares
        (``CheckpointSource.remote``); ``workers.sources.source_of`` holds a plan to it."""
        return self.root is None


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
