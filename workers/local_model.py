"""The rank's transformers model, holding the rank's local tensors.

The rank rebuilds the same meta skeleton the planner used, then installs its loaded tensors in place
of the meta parameters (tied parameters become the very same ``Parameter`` object). Parameters of
other pipeline stages stay on meta and are never touched. Non-persistent buffers — rotary
``inv_freq``, scaled-embedding factors, position ids — are *not* in the checkpoint; after installing,
they would be garbage (``to_empty``) or meta, so they are materialized and recomputed by the model's
own ``_init_weights``, exactly as transformers' ``from_pretrained`` does, with every loaded tensor
marked initialized so nothing loaded is overwritten.

Runs on every rank.
"""

from __future__ import annotations

import torch

from planning.plan import LoadPlan, RankPlan
from planning.skeleton import build_meta_model, config_from_dict, parse_dtype


def rebuild_meta_model(plan: LoadPlan) -> torch.nn.Module:
    config = config_from_dict(plan.model.config, source=f"{plan.model.source}/config.json")
    attn = "eager" if plan.attn_implementation == "eager" else "sdpa"
    return build_meta_model(
        config, model_class=plan.model.class_name, dtype=parse_dtype(plan.dtype), attn_implementation=attn
    )


def _install(model: torch.nn.Module, name: str, value: torch.Tensor, *, is_buffer: bool) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if is_buffer:
        module._buffers[leaf] = value
    else:
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
        module._parameters[leaf] = value


def build_local_model(
    plan: LoadPlan,
    rank_plan: RankPlan,
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    *,
    meta_model: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """Install ``tensors`` (name → local tensor) into a fresh (or the given, unused) meta model and compute the buffers."""
    model = meta_model if meta_model is not None else rebuild_meta_model(plan)
    installed: dict[str, torch.Tensor] = {}
    for p in rank_plan.params:
        if p.alias_of is not None or p.computed:
            continue
        _install(model, p.name, tensors[p.name], is_buffer=p.is_buffer)
        installed[p.name] = model.get_parameter(p.name) if not p.is_buffer else model.get_buffer(p.name)
    for p in rank_plan.params:
        if p.alias_of is not None:
            _install(model, p.name, installed[p.alias_of], is_buffer=p.is_buffer)
        elif p.computed:
            spec_buffer = model.get_buffer(p.name)
            _install(model, p.name, torch.empty(p.shape, dtype=spec_buffer.dtype, device=device), is_buffer=True)
    for name, buffer in list(model.named_non_persistent_buffers()):
        _install(model, name, torch.empty_like(buffer, device=device), is_buffer=True)

    # Recompute buffers with the model's own init, touching nothing that was loaded (or lives on another stage).
    computed = {p.name for p in rank_plan.params if p.computed} | {n for n, _ in model.named_non_persistent_buffers()}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if name not in computed:
            tensor._is_hf_initialized = True
    for module in model.modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if all(getattr(t, "_is_hf_initialized", False) for t in own):
            module._is_hf_initialized = True
    model.initialize_weights()
    return model
