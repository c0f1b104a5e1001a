"""From "a model and a topology" to a validated ``LoadPlan``, reading headers only.

This is the planning stage end to end: resolve the checkpoint (local folder, single file or Hub
repo) into a ``CheckpointIndex`` and ``config.json``; build the meta skeleton; merge TP plans; map
checkpoint tensors through converters; cut pipeline stages; plan every rank. No Ray, no weight bytes.

Runs on the driver (``orchestrator.plan``/``load`` and ``meshload plan``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from planning.checkpoint import CheckpointIndex, build_local_index, find_checkpoint
from planning.confinement import confined_path
from planning.conversions import build_source_map
from planning.errors import CheckpointError, ConfigError, ConversionError, PlanError
from planning.pipeline import assign_stages
from planning.quantization import quantization_of, scale_owner
from planning.offload import rank_budgets, split_device_map
from planning.build import PlanInputs, build_plan, node_blocks
from planning.plan import LoadPlan, ModelRef
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE
from planning.skeleton import (
    attention_of,
    build_meta_model,
    choose_model_class,
    config_from_dict,
    describe,
    dtype_name,
    flash_attention_available,
    trace_first_layer,
    parse_dtype,
)
from planning.tp_plans import check_user_plan, effective_plan

if TYPE_CHECKING:
    import torch
    from transformers.utils.quantization_config import QuantizationConfigMixin

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint located and indexed: where it is, its config, its tensors."""

    ref_source: str
    kind: str  # "local" or "hub"
    root: str | None
    revision: str | None
    config_dict: dict
    index: CheckpointIndex


def resolve_model(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
) -> ResolvedModel:
    """Locate ``model`` (a local folder, a ``.safetensors`` file, or a Hub repo id) and index it from headers."""
    path = os.fspath(model)
    if os.path.exists(path):
        root, _, _ = find_checkpoint(path)
        if not os.path.isfile(os.path.join(root, "config.json")):
            raise ConfigError(f"{root}: no config.json next to the checkpoint")
        config_path = confined_path(root, "config.json", what=root)
        try:
            with open(config_path, encoding="utf-8") as f:
                config_dict = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid JSON ({exc})") from None
        index = build_local_index(path, allow_pickle=allow_pickle)
        return ResolvedModel(path, "local", root, None, config_dict, index)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ConfigError(f"{path}: no such file or folder (and not a Hub repo id of the form 'org/name')")
    from planning.hub_index import resolve_hub_model

    return resolve_hub_model(path, revision=revision, cache_dir=cache_dir, token=token)


def resolve_plan_checkpoint(
    plan: LoadPlan, *, cache_dir: str | None = None, token: str | bool | None = None, allow_pickle: bool = False
) -> ResolvedModel:
    """The checkpoint ``plan`` names, resolved now (headers read again) so that the plan can be checked
    against it (``planning.plan_check``) before anything runs. A local plan is resolved from its folder
    (through the path it was planned from, when that still leads to the same folder); a Hub plan at its
    commit. A pickle checkpoint needs ``allow_pickle`` here too."""
    m = plan.model
    if m.kind == "hub":
        return resolve_model(m.source, revision=m.revision, cache_dir=cache_dir, token=token)
    if m.checkpoint_format == "pickle" and not allow_pickle:
        raise CheckpointError(
            f"the plan of {m.source!r} reads a pickle checkpoint in {m.root}; pass allow_pickle=True to load it "
            f"(it is read with torch.load(weights_only=True))"
        )
    source = m.root
    try:
        if os.path.exists(m.source) and find_checkpoint(m.source)[0] == m.root:
            source = m.source  # e.g. a single .safetensors file next to others
    except CheckpointError:
        pass
    try:
        return resolve_model(source, allow_pickle=allow_pickle)
    except (CheckpointError, ConfigError) as exc:
        raise type(exc)(f"the plan names the checkpoint folder {m.root}, which cannot be resolved: {exc}") from None


def resolve_dtype(dtype: str | torch.dtype, config, index: CheckpointIndex) -> torch.dtype:
    """``"auto"``: the config's dtype, else the checkpoint's dominant floating dtype, else float32."""
    if dtype != "auto":
        return parse_dtype(dtype)
    configured = getattr(config, "dtype", None)
    if configured is not None:
        return parse_dtype(configured)
    return parse_dtype(index.dominant_float_dtype() or "float32")


def check_topology(tp: int, pp: int, nodes: int) -> None:
    for name, value in (("tp", tp), ("pp", pp), ("nodes", nodes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlanError(f"{name}={value!r} must be a positive integer")
    node_blocks(tp * pp, nodes)


def check_options(*, device: str, attn_implementation: str | None) -> None:
    if device not in DEVICES:
        raise PlanError(f"device={device!r}: expected one of {DEVICES}")
    if attn_implementation is not None and attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise PlanError(
            f"attn_implementation={attn_implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS} "
            f"(or None for transformers' choice)"
        )
    if attn_implementation == "flash_attention_2":
        if device != "cuda":
            raise PlanError("attn_implementation='flash_attention_2' needs device='cuda' (flash-attn has no CPU kernels)")
        if not flash_attention_available():
            raise PlanError(
                "attn_implementation='flash_attention_2' but flash-attn is not installed here "
                "(pip install 'meshload[flash]'); no weight was fetched"
            )


def make_plan(
    model: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    nodes: int = 1,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    tp_plan: dict[str, str] | None = None,
    device_map: dict[str, int | str] | None = None,
    max_memory=None,
    attn_implementation: str | None = None,
    model_class: str | None = None,
    renamings: dict[str, str] | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    resolved: ResolvedModel | None = None,
    quantization: QuantizationConfigMixin | dict | None = None,
) -> LoadPlan:
    """Plan a load (see module docstring). ``resolved`` reuses an already indexed checkpoint.

    ``quantization``: a transformers quantization config of the checkpoint's own method whose loading
    attributes override the checkpoint's (``FineGrainedFP8Config(dequantize=True)``), as ``from_pretrained``
    merges them (``planning.quantization``)."""
    check_topology(tp, pp, nodes)
    check_options(device=device, attn_implementation=attn_implementation)
    resolved = resolved or resolve_model(model, revision=revision, cache_dir=cache_dir, token=token, allow_pickle=allow_pickle)
    source = f"{resolved.ref_source}/config.json"
    config = config_from_dict(resolved.config_dict, source=source)
    torch_dtype = resolve_dtype(dtype, config, resolved.index)
    quant = quantization_of(resolved.config_dict, override=quantization, source=source)
    meta = build_meta_model(
        config,
        model_class=model_class or choose_model_class(config, resolved.index.tensors, source=source),
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
    check_user_plan(tp_plan, skeleton, [name for name, _ in meta.named_modules() if name])
    plan_dict = effective_plan(meta, user_plan=tp_plan)
    sources = build_source_map(meta, skeleton, resolved.index, renamings=renamings, where=str(resolved.ref_source),
                               quantization=quant)
    unfilled = sorted(n for n in sources.computed if scale_owner(n, quant))
    if unfilled:
        raise ConversionError(
            f"{resolved.ref_source}: the {quant.method} checkpoint fills no value for {len(unfilled)} scale tensor(s) of the "
            f"model, e.g. {unfilled[:3]}: its scales are stored under names transformers' conversions do not map "
            f"(an initialised scale would scale every weight of its block wrongly)"
        )
    budgets = rank_budgets(max_memory, tp * pp, device=device)
    stage_map, offload_tiers = split_device_map(device_map, device=device)
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
