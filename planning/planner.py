"""From "a resolved checkpoint and a topology" to a validated ``LoadPlan``: pure, data in, plan out.

This is the planning stage end to end, from a ``ResolvedModel`` (the ``CheckpointIndex`` and
``config.json`` a checkpoint source read: ``workers.sources``): build the meta skeleton; merge TP
plans; map checkpoint tensors through converters; cut pipeline stages; plan every rank. No Ray, no
I/O, no weight bytes.

Runs on the driver (``orchestrator.plan``/``load`` and ``meshload plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from planning.checkpoint import CheckpointIndex
from planning.conversions import build_source_map
from planning.errors import ConversionError, PlanError
from planning.options import PlanOptions
from planning.pipeline import assign_stages
from planning.quantization import quantization_of, scale_owner
from planning.offload import rank_budgets, split_device_map
from planning.build import PlanInputs, build_plan
from planning.plan import LoadPlan, ModelRef
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE
from planning.skeleton import (
    attention_of,
    build_meta_model,
    choose_model_class,
    config_from_dict,
    describe,
    dtype_name,
    trace_first_layer,
    parse_dtype,
)
from planning.tp_plans import check_user_plan, effective_plan

if TYPE_CHECKING:
    import torch

@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint located and indexed by its source (``workers.sources``): where it is, its config, its tensors."""

    ref_source: str
    kind: str  # the source's kind (``workers.sources.SOURCES``): "local", "hub", "s3"
    root: str | None
    revision: str | None
    config_dict: dict
    index: CheckpointIndex


def resolve_dtype(dtype: str | torch.dtype, config, index: CheckpointIndex) -> torch.dtype:
    """``"auto"``: the config's dtype, else the checkpoint's dominant floating dtype, else float32."""
    if dtype != "auto":
        return parse_dtype(dtype)
    configured = getattr(config, "dtype", None)
    if configured is not None:
        return parse_dtype(configured)
    return parse_dtype(index.dominant_float_dtype() or "float32")


def make_plan(resolved: ResolvedModel, options: PlanOptions = PlanOptions()) -> LoadPlan:
    """Plan a load of the checkpoint ``resolved`` with ``options`` (validated when they were made; see module docstring).

    ``options.quantization``: a transformers quantization config of the checkpoint's own method whose loading
    attributes override the checkpoint's (``FineGrainedFP8Config(dequantize=True)``), as ``from_pretrained``
    merges them (``planning.quantization``)."""
    tp, pp, nodes, device = options.tp, options.pp, options.nodes, options.device
    attn_implementation, quantization = options.attn_implementation, options.quantization
    source = f"{resolved.ref_source}/config.json"
    config = config_from_dict(resolved.config_dict, source=source)
    torch_dtype = resolve_dtype(options.dtype, config, resolved.index)
    quant = quantization_of(resolved.config_dict, override=quantization, source=source)
    meta = build_meta_model(
        config,
        model_class=options.model_class or choose_model_class(config, resolved.index.tensors, source=source),
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
        source=source,
        quantization=quant,
    )
    attn_implementation = attn_implementation or attention_of(meta)
    skeleton = describe(meta, dtype=torch_dtype)
    if skeleton.heads_vary and tp > 1:
        raise PlanError(
            f"tp={tp}: {skeleton.class_name}'s attention head counts vary per layer (config.per_layer_config), and "
            f"splitting heads needs one count for every layer; use tp=1 (pp splits the model instead)"
        )
    check_user_plan(options.tp_plan, skeleton, [name for name, _ in meta.named_modules() if name])
    plan_dict = effective_plan(meta, user_plan=options.tp_plan)
    sources = build_source_map(meta, skeleton, resolved.index, renamings=options.renamings, where=str(resolved.ref_source),
                               quantization=quant)
    unfilled = sorted(n for n in sources.computed if scale_owner(n, quant))
    if unfilled:
        raise ConversionError(
            f"{resolved.ref_source}: the {quant.method} checkpoint fills no value for {len(unfilled)} scale tensor(s) of the "
            f"model, e.g. {unfilled[:3]}: its scales are stored under names transformers' conversions do not map "
            f"(an initialised scale would scale every weight of its block wrongly)"
        )
    budgets = rank_budgets(options.max_memory, tp * pp, device=device)
    stage_map, offload_tiers = split_device_map(options.device_map, device=device)
    tensor_bytes = {t.name: t.numel * TORCH_DTYPE_ITEMSIZE[t.dtype] for t in skeleton.tensors}
    device_budgets = [b.device for b in budgets]
    stage_budgets = [
        None if any(b is None for b in device_budgets[s * tp : (s + 1) * tp]) else min(device_budgets[s * tp : (s + 1) * tp]) * tp
        for s in range(pp)
    ]
    trace = trace_first_layer(meta, skeleton.layers_path) if pp > 1 and skeleton.layers_path else None
    stages = assign_stages(skeleton, pp, tensor_bytes=tensor_bytes, budgets=stage_budgets, device_map=stage_map,
                           trace=trace)
    ref = ModelRef(
        source=str(resolved.ref_source),
        kind=resolved.kind,
        root=resolved.root,
        revision=resolved.revision,
        class_name=skeleton.class_name,
        model_type=skeleton.model_type,
        config=resolved.config_dict,
        checkpoint_format=resolved.index.format,
    )
    return build_plan(
        PlanInputs(
            model_ref=ref,
            config=config,
            skeleton=skeleton,
            index=resolved.index,
            sources=sources,
            stages=stages,
            tp_plan=plan_dict,
            tp=tp,
            pp=pp,
            num_nodes=nodes,
            dtype=dtype_name(torch_dtype),
            device=device,
            attn_implementation=attn_implementation,
            budgets=budgets,
            quantization=quant,
            offload_tiers=offload_tiers,
        )
    )
