"""What each tensor-parallel style does to a parameter: which dimension splits, in which pieces.

Style names are transformers' (``colwise``, ``rowwise``, ``packed_colwise``, ``embedding_rowwise``,
``colwise_gather_output``, ``moe_tp_experts`` ...), plus two spellings of our own for fused tensors
whose parts differ in size: ``packed_colwise:qkv`` (query, key and value heads packed along the
output dimension, as in Phi-3's ``qkv_proj`` or GPT-2's ``c_attn``) and ``packed_colwise:N``
(N equal parts).

A rank's local tensor is the full parameter cut along one dimension into ``pieces`` laid end to end,
optionally followed by zero padding (so that every rank of a gathered output — vocab-parallel
embeddings and LM heads — has the same size). Sharding is head-aware: query heads are split evenly,
and when ``tp`` exceeds the number of key/value heads each KV head is replicated on ``tp // kv`` ranks.
A degree that cannot work raises ``PlanError`` naming the dimension.

Pure functions, used by planning for every rank in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

from planning.errors import PlanError
from planning.families import KV_NAMES, QUERY_NAMES
from planning.shard import Shard
from planning.skeleton import HeadLayout, TensorSpec


@dataclass(frozen=True, slots=True)
class StyleRule:
    """How a style treats a module's parameters and what the rank must do at forward time."""

    axis: str | None  # "out", "in", "vocab", "hidden", or None (parameters stay whole)
    uniform: bool = False  # pad so every rank has the same local size (outputs are gathered)
    packed: bool = False
    runtime: str = "none"  # see workers.tp_runtime


STYLES: dict[str, StyleRule] = {
    "colwise": StyleRule("out"),
    "colwise_gather_output": StyleRule("out", uniform=True, runtime="gather_output"),
    "colwise_rep": StyleRule("out", uniform=True, runtime="gather_output"),
    "rowwise": StyleRule("in", runtime="all_reduce_output"),
    "rowwise_split_input": StyleRule("in", runtime="split_input_all_reduce"),
    "rowwise_rep": StyleRule("in", runtime="split_input_all_reduce"),
    "packed_colwise": StyleRule("out", packed=True),
    "packed_rowwise": StyleRule("in", packed=True, runtime="all_reduce_output"),
    "embedding_rowwise": StyleRule("vocab", uniform=True, runtime="vocab_parallel_embedding"),
    "embedding_colwise": StyleRule("hidden", uniform=True, runtime="gather_output"),
    "moe_tp_experts": StyleRule(None, runtime="all_reduce_output"),
    "all_reduce": StyleRule(None, runtime="all_reduce_output"),
    # Styles that only matter for gradients: for inference the parameter is simply replicated.
    "replicate": StyleRule(None),
    "replicated_with_grad_allreduce": StyleRule(None),
    "mla_kv_a_proj": StyleRule(None),
    "local_params": StyleRule(None),
}

def split_style(style: str) -> tuple[str, str | None]:
    """``"packed_colwise:qkv"`` → ``("packed_colwise", "qkv")``."""
    base, _, arg = style.partition(":")
    return base, (arg or None)


def style_rule(style: str, *, where: str) -> StyleRule:
    base, arg = split_style(style)
    rule = STYLES.get(base)
    if rule is None:
        raise PlanError(f"TP plan entry {where!r}: unknown style {style!r}; known: {sorted(STYLES)}")
    if arg is not None and not rule.packed:
        raise PlanError(f"TP plan entry {where!r}: style {base!r} takes no ':{arg}' argument")
    return rule


def even_piece(size: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """Rank ``tp_rank``'s piece of ``size`` split in ``ceil(size / tp)`` chunks (the last ones may be shorter)."""
    chunk = -(-size // tp)
    start = min(tp_rank * chunk, size)
    return start, min(size, start + chunk) - start


def head_piece(
    num_heads: int, head_dim: int, tp: int, tp_rank: int, *, kind: str, what: str
) -> tuple[int, int]:
    """Rank ``tp_rank``'s heads, as an element range; KV heads are replicated when ``tp > num_heads``."""
    if num_heads % tp == 0:
        per = num_heads // tp
        return tp_rank * per * head_dim, per * head_dim
    if kind == "kv" and tp % num_heads == 0:
        head = tp_rank // (tp // num_heads)
        return head * head_dim, head_dim
    if kind == "kv":
        raise PlanError(
            f"{what}: tp={tp} cannot split num_key_value_heads={num_heads}: tp must divide it or be a multiple of it"
        )
    raise PlanError(f"{what}: tp={tp} does not divide num_attention_heads={num_heads}")


def _axis_dim(spec: TensorSpec, axis: str, *, param_level: bool) -> int | None:
    """The dimension of ``spec`` that ``axis`` refers to, or None when this tensor stays whole (a rowwise bias)."""
    ndim = len(spec.shape)
    leaf = spec.name.rpartition(".")[2]
    if ndim == 0:
        return None
    if axis in ("vocab", "hidden"):
        return (0 if axis == "vocab" else 1) if ndim == 2 else None
    if param_level or spec.module_type not in ("Linear", "Conv1D"):
        if ndim == 1:
            return 0 if axis == "out" else None
        return ndim - 2 if axis == "out" else ndim - 1
    if leaf == "bias" or ndim == 1:
        return 0 if axis == "out" else None
    transposed = spec.module_type == "Conv1D"  # GPT-2's Conv1D stores weight as (in, out)
    return (1 if axis == "out" else 0) if transposed else (0 if axis == "out" else 1)


def _parts(spec: TensorSpec, size: int, arg: str | None, heads: HeadLayout | None, *, where: str) -> list[tuple[str, int]]:
    """The packed parts along the split dimension, each with its kind ("q", "kv", "plain")."""
    if arg == "qkv":
        if heads is None:
            raise PlanError(f"{where}: 'packed_colwise:qkv' needs attention head counts in the config")
        q, kv = heads.num_heads * heads.head_dim, heads.num_kv_heads * heads.head_dim
        if q + 2 * kv != size:
            raise PlanError(
                f"{spec.name}: packed qkv size {size} != num_heads*head_dim + 2*num_kv_heads*head_dim "
                f"({heads.num_heads}*{heads.head_dim} + 2*{heads.num_kv_heads}*{heads.head_dim} = {q + 2 * kv})"
            )
        return [("q", q), ("kv", kv), ("kv", kv)]
    count = 2 if arg is None else int(arg) if arg.isdigit() else 0
    if count < 1:
        raise PlanError(f"{where}: packed style argument {arg!r} must be 'qkv' or a part count")
    if size % count:
        raise PlanError(f"{spec.name}: packed dimension of size {size} does not split into {count} equal parts")
    return [("plain", size // count)] * count


def _kind(spec: TensorSpec) -> str:
    module_leaf = spec.module.rpartition(".")[2]
    if module_leaf in QUERY_NAMES:
        return "q"
    if module_leaf in KV_NAMES:
        return "kv"
    return "plain"


def shard_for(
    spec: TensorSpec,
    style: str | None,
    *,
    param_level: bool,
    tp: int,
    tp_rank: int,
    heads: HeadLayout | None,
    where: str = "",
) -> Shard | None:
    """The rank's shard of ``spec`` under ``style``, or None when the rank holds it whole."""
    if style is None or tp == 1:
        return None
    base, arg = split_style(style)
    rule = style_rule(style, where=where or spec.name)
    if rule.axis is None:
        return None
    dim = _axis_dim(spec, rule.axis, param_level=param_level)
    if dim is None:
        return None
    size = spec.shape[dim]
    if rule.packed:
        parts = _parts(spec, size, arg, heads, where=where or spec.name)
    else:
        parts = [(_kind(spec) if rule.axis == "out" else "plain", size)]
    pieces, offset, local = [], 0, 0
    for kind, part_size in parts:
        if kind in ("q", "kv") and heads is not None:
            count = heads.num_heads if kind == "q" else heads.num_kv_heads
            if count * heads.head_dim != part_size:
                # The module is not a full-width attention projection (e.g. a LoRA-style low rank one).
                kind = "plain"
        if kind in ("q", "kv") and heads is not None:
            count = heads.num_heads if kind == "q" else heads.num_kv_heads
            start, length = head_piece(count, heads.head_dim, tp, tp_rank, kind=kind, what=spec.name)
        else:
            start, length = even_piece(part_size, tp, tp_rank)
        pieces.append((offset + start, length))
        local += -(-part_size // tp) if rule.uniform else length
        offset += part_size
    if rule.uniform and size < tp:
        raise PlanError(f"{spec.name}: dimension {dim} of size {size} is smaller than tp={tp}")
    return Shard(dim=dim, pieces=tuple(pieces), local_size=local, full_size=size)
