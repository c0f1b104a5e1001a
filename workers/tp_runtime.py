"""Tensor-parallel execution of transformers' own modules holding local shards.

After loading, a rank's modules hold their local slices (see ``planning.tp_styles``). For the
forward pass to equal the unsharded model, some modules need a collective around them, chosen by the
style's ``runtime``:

- ``all_reduce_output`` (rowwise layers, MoE experts): each rank computes a partial sum; all-reduce it.
  A rowwise bias is added once, *after* the all-reduce — never once per rank.
- ``split_input_all_reduce`` (``rowwise_split_input``): the input arrives replicated; each rank takes
  its slice of the last dimension, then as above.
- ``gather_output`` (``colwise_gather_output``: LM heads; ``embedding_colwise``): all-gather the
  equal-sized local outputs along the last dimension and drop the padding, so logits are full-vocab.
- ``vocab_parallel_embedding`` (``embedding_rowwise``): ids outside this rank's vocabulary rows are
  looked up as row 0 and zeroed (masked lookup), then the partial embeddings are all-reduced.

The style's ``runtime`` picks its installer from one table (``RUNTIMES``). Attention modules whose
projections are split by heads (their names, separate or fused, from ``planning.families``) get their
head counts fixed (``num_heads``, ``num_key_value_heads``, ``num_key_value_groups``, the families'
head-sized attributes such as GPT-2's ``split_size``, and a local config copy for code that reads
``config.num_attention_heads``), including the GQA case where KV heads are replicated.

Runs on every rank, after the local model is built and before the first forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from planning.plan import LoadPlan, ParamPlan, RankPlan
from planning.tp_plans import PlanMatcher
from planning.families import FUSED_ATTENTION_NAMES, HEAD_COUNT_ATTRS, KV_NAMES, QUERY_NAMES
from planning.tp_styles import StyleRule, style_rule


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum); gloo cannot reduce bfloat16/float16, so those go through float32."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        y = x.float()
        dist.all_reduce(y, group=group)
        return y.to(x.dtype)
    dist.all_reduce(x, group=group)
    return x


def _gather_last(x: torch.Tensor, group, keep: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    full = torch.cat(parts, dim=-1)
    return full.index_select(-1, keep.to(full.device))


def _gather_keep(weight: ParamPlan, tp_ranks: list[ParamPlan]) -> torch.Tensor:
    """Indices of the real (non-padding) columns in the concatenation of all ranks' padded outputs."""
    keep = []
    for r, p in enumerate(tp_ranks):
        base = r * p.shard.local_size
        held = sum(length for _, length in p.shard.pieces)
        keep.extend(range(base, base + held))
    return torch.tensor(keep, dtype=torch.long)


class GroupSlot:
    """The process group the installed collectives use. After a peer is lost and the process group is
    formed again, the rank points this at the new group; the collectives installed on its modules
    follow (they are installed once: installing them again would reduce twice)."""

    def __init__(self, group) -> None:
        self.group = group


def _without_bias(module: torch.nn.Module, forward, x: torch.Tensor) -> torch.Tensor:
    """``forward(x)`` of a module whose own forward adds its bias (a quantized linear layer such as transformers'
    ``FP8Linear``, whose matmul is its own kernel), with the bias left out: it is added once, after the reduction."""
    bias = module._parameters.get("bias")
    if bias is None:
        return forward(x)
    module._parameters["bias"] = None
    try:
        return forward(x)
    finally:
        module._parameters["bias"] = bias


def _rowwise_forward(module: torch.nn.Module, slot: GroupSlot, *, split: list[tuple[int, int]] | None):
    is_conv1d = type(module).__name__ == "Conv1D"
    # transformers marks the modules its quantizers put in (FP8Linear, ...): their forward is their own kernel
    own_matmul = getattr(module, "_hf_quantized_needs_local_tp", False)
    original = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if split is not None:  # replicated input: keep this rank's columns
            x = torch.cat([x[..., s : s + n] for s, n in split], dim=-1)
        if is_conv1d:
            out = (x.reshape(-1, x.shape[-1]) @ module.weight).reshape(*x.shape[:-1], module.weight.shape[-1])
        elif own_matmul:
            out = _without_bias(module, original, x)
        else:
            out = F.linear(x, module.weight)
        out = _sum(out, slot.group)
        return out + module.bias if module.bias is not None else out

    return forward


def _all_reduce_after(module: torch.nn.Module, slot: GroupSlot):
    original = module.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, tuple):
            return (_sum(out[0], slot.group), *out[1:])
        return _sum(out, slot.group)

    return forward


def _gather_after(module: torch.nn.Module, slot: GroupSlot, keep: torch.Tensor):
    original = module.forward

    def forward(*args, **kwargs):
        return _gather_last(original(*args, **kwargs), slot.group, keep)

    return forward


def _vocab_parallel(module: torch.nn.Module, slot: GroupSlot, weight: ParamPlan):
    original = module.forward
    ranges = [(s, s + n) for s, n in weight.shard.pieces]
    # A local embedding table cannot keep the full-vocabulary padding_idx (F.embedding checks it);
    # padding_idx only matters for gradients, so inference output is unchanged.
    module.padding_idx = None

    def forward(input_ids: torch.Tensor, *args, **kwargs):
        local = torch.zeros_like(input_ids)
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        at = 0
        for start, stop in ranges:
            inside = (input_ids >= start) & (input_ids < stop)
            local = torch.where(inside, input_ids - start + at, local)
            mask |= inside
            at += stop - start
        out = original(local, *args, **kwargs)
        out = out * mask.unsqueeze(-1).to(out.dtype)
        return _sum(out, slot.group)

    return forward


@dataclass(frozen=True, slots=True)
class Site:
    """What an installer needs to know about the module it wraps: its style's rule, its weight's plan on this
    rank (None: the module holds no weight of the plan), the plans of this rank's stage, the group slot."""

    rule: StyleRule
    weight: ParamPlan | None
    stage_ranks: list[RankPlan]
    slot: GroupSlot


def _install_all_reduce(module: torch.nn.Module, site: Site):
    if site.rule.axis == "in" and hasattr(module, "weight"):  # rowwise layer: the bias once, after the reduction
        return _rowwise_forward(module, site.slot, split=None)
    return _all_reduce_after(module, site.slot)  # a module whose output is a partial sum (MoE experts)


def _install_split_input(module: torch.nn.Module, site: Site):
    shard = site.weight.shard if site.weight is not None else None
    return _rowwise_forward(module, site.slot, split=list(shard.pieces) if shard else None)


def _install_gather(module: torch.nn.Module, site: Site):
    weight = site.weight
    if weight is None or weight.shard is None:
        return None
    tp_params = [next(p for p in r.params if p.name == weight.name) for r in site.stage_ranks]
    return _gather_after(module, site.slot, _gather_keep(weight, tp_params))


def _install_vocab_parallel(module: torch.nn.Module, site: Site):
    if site.weight is None or site.weight.shard is None:
        return None
    return _vocab_parallel(module, site.slot, site.weight)


# A style's ``runtime`` (planning.tp_styles.STYLES) → what installs it: a new forward for the module, or None
# when the module needs nothing on this rank.
RUNTIMES: dict[str, Callable[[torch.nn.Module, Site], Callable | None]] = {
    "none": lambda module, site: None,
    "all_reduce_output": _install_all_reduce,
    "split_input_all_reduce": _install_split_input,
    "gather_output": _install_gather,
    "vocab_parallel_embedding": _install_vocab_parallel,
}


# Size attributes of a module kind, in the order of its 2-D weight's dimensions (GPT-2's Conv1D reshapes by ``nf``).
_SHAPE_ATTRS: dict[str, tuple[str, str]] = {
    "Conv1D": ("nx", "nf"),
    "Linear": ("out_features", "in_features"),
    "Embedding": ("num_embeddings", "embedding_dim"),
}


def _shape_attrs(module: torch.nn.Module) -> tuple[str, str] | None:
    if type(module).__name__ == "Conv1D":
        return _SHAPE_ATTRS["Conv1D"]
    for base in (torch.nn.Linear, torch.nn.Embedding):  # subclasses too (quantized linears)
        if isinstance(module, base):
            return _SHAPE_ATTRS[base.__name__]
    return None


def _fix_shapes(module: torch.nn.Module) -> None:
    """Keep a sharded module's size attributes consistent with its local weight."""
    weight = getattr(module, "weight", None)
    attrs = _shape_attrs(module)
    if weight is None or weight.dim() != 2 or attrs is None:
        return
    for attr, size in zip(attrs, weight.shape):
        setattr(module, attr, size)


def _local_heads(plan: LoadPlan) -> tuple[int, int]:
    h, kv, tp = plan.heads.num_heads, plan.heads.num_kv_heads, plan.tp
    return h // tp, (kv // tp if kv % tp == 0 else 1)


def _fix_attention(model: torch.nn.Module, plan: LoadPlan, sharded: set[str]) -> None:
    """Give attention modules whose projections are split by heads their local head counts."""
    if plan.heads is None:
        return
    full_q, full_kv, head_dim = plan.heads.num_heads, plan.heads.num_kv_heads, plan.heads.head_dim
    local_q, local_kv = _local_heads(plan)
    for name, module in model.named_modules():
        children = {child for child, _ in module.named_children()}
        split_children = {c for c in children if f"{name}.{c}".lstrip(".") in sharded}
        if not (split_children & (QUERY_NAMES | KV_NAMES | FUSED_ATTENTION_NAMES)):
            continue
        for attr, full, local in (
            ("num_heads", full_q, local_q),
            ("num_attention_heads", full_q, local_q),
            ("num_key_value_heads", full_kv, local_kv),
            *((a, full_q * head_dim, local_q * head_dim) for a in HEAD_COUNT_ATTRS),  # families' (planning.families)
        ):
            if getattr(module, attr, None) == full:
                setattr(module, attr, local)
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = local_q // local_kv
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "num_attention_heads", None) == full_q:
            local_config = copy.copy(config)
            local_config.num_attention_heads = local_q
            if getattr(config, "num_key_value_heads", None) == full_kv:
                local_config.num_key_value_heads = local_kv
            module.config = local_config


def apply_tensor_parallel(
    model: torch.nn.Module, plan: LoadPlan, rank_plan: RankPlan, group: GroupSlot
) -> list[tuple[str, str]]:
    """Install the collectives of every module-level plan entry this rank holds, on ``group.group``;
    returns (module, runtime)."""
    if plan.tp == 1:
        return []
    matcher = PlanMatcher(plan.tp_plan)
    params = {p.name: p for p in rank_plan.params}
    stage_ranks = [r for r in plan.ranks if r.stage == rank_plan.stage]
    held_modules = {p.name.rpartition(".")[0] for p in rank_plan.params if not p.is_buffer}
    sharded = {p.name.rpartition(".")[0] for p in rank_plan.params if p.shard is not None}
    installed = []
    for name, module in list(model.named_modules()):
        if name not in held_modules:
            continue
        if name in sharded:
            _fix_shapes(module)
        m = matcher.match_module(name)
        if m is None:
            continue
        rule = style_rule(m.style, where=m.key)
        install = RUNTIMES[rule.runtime]
        forward = install(module, Site(rule=rule, weight=params.get(f"{name}.weight"), stage_ranks=stage_ranks, slot=group))
        if forward is None:
            continue
        module.forward = forward
        installed.append((name, rule.runtime))
    _fix_attention(model, plan, sharded)
    return installed
