"""The rank's transformers model, holding the rank's local tensors.

The rank rebuilds the same meta skeleton the planner used, then installs its loaded tensors in place
of the meta parameters (tied parameters become the very same ``Parameter`` object). Parameters of
other pipeline stages stay on meta and are never touched. Non-persistent buffers — rotary
``inv_freq``, scaled-embedding factors, position ids — are *not* in the checkpoint; after installing,
they would be garbage (``to_empty``) or meta, so they are materialized and recomputed by the model's
own ``_init_weights``, exactly as transformers' ``from_pretrained`` does, with every loaded tensor
marked initialized so nothing loaded is overwritten.

Tensors the checkpoint lacks (``ParamPlan.computed``: a task head on a base-model checkpoint, a
persistent buffer) get the same treatment, as ``from_pretrained`` initialises its missing keys: each
is initialised at its full shape — from one fixed seed, so every TP rank of a stage computes the same
values and a replicated tensor is equal on all of them — then cut down to the rank's shard.

Runs on every rank.
"""

from __future__ import annotations

import torch

from planning.plan import LoadPlan, ParamPlan, RankPlan
from planning.skeleton import build_meta_model, config_from_dict, parse_dtype
from workers.dequantize import dequantize_shards


INIT_SEED = 0  # seed of the initialisation of tensors the checkpoint lacks (the same on every rank)


def rebuild_meta_model(plan: LoadPlan) -> torch.nn.Module:
    """The planner's meta model; for a quantized checkpoint loaded with ``dequantize``, the plain one transformers
    builds then (its weights are the dequantized shards, ``workers.dequantize``)."""
    config = config_from_dict(plan.model.config, source=f"{plan.model.source}/config.json")
    quantization = plan.quantization
    return build_meta_model(
        config, model_class=plan.model.class_name, dtype=parse_dtype(plan.dtype),
        attn_implementation=plan.attn_implementation,
        quantization=None if quantization is None or quantization.dequantize else quantization,
    )


def install(model: torch.nn.Module, name: str, value: torch.Tensor, *, is_buffer: bool) -> None:
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
    """Install ``tensors`` (name → local tensor) into a fresh (or the given, unused) meta model, initialise what the
    checkpoint lacks and the non-persistent buffers; ``tensors`` gains the initialised tensors and every alias.
    Quantized shards loaded with ``dequantize`` are dequantized first (their scales leave ``tensors``)."""
    model = meta_model if meta_model is not None else rebuild_meta_model(plan)
    consumed = set(dequantize_shards(plan, rank_plan, tensors, model))
    for p in rank_plan.params:
        if p.alias_of is None and not p.computed and p.name not in consumed:
            install(model, p.name, tensors[p.name], is_buffer=p.is_buffer)
    initialised = [p for p in rank_plan.params if p.computed]
    for p in initialised:  # at full shape: the model's init sees the tensor transformers would initialise
        meta = get_tensor(model, p.name, is_buffer=p.is_buffer)
        install(model, p.name, torch.empty(p.full_shape, dtype=meta.dtype, device=device), is_buffer=p.is_buffer)
    for name, buffer in list(model.named_non_persistent_buffers()):
        install(model, name, torch.empty_like(buffer, device=device), is_buffer=True)

    # Initialise with the model's own init, touching nothing that was loaded (or lives on another stage).
    todo = {p.name for p in initialised} | {n for n, _ in model.named_non_persistent_buffers()}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if name not in todo:
            tensor._is_hf_initialized = True
    for module in model.modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if all(getattr(t, "_is_hf_initialized", False) for t in own):
            module._is_hf_initialized = True
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(INIT_SEED)
        model.initialize_weights()
    full = {p.name: get_tensor(model, p.name, is_buffer=p.is_buffer).detach() for p in initialised}
    for p in initialised:
        value = full[p.tied_to] if p.tied_to is not None else full[p.name]  # a tie: the owner's value, as transformers ties
        if p.shard is not None or p.tied_to is not None:
            install(model, p.name, shard_of(value, p) if p.shard is not None else value.clone(), is_buffer=p.is_buffer)
        tensors[p.name] = get_tensor(model, p.name, is_buffer=p.is_buffer)
    for p in rank_plan.params:
        if p.alias_of is not None:
            install(model, p.name, get_tensor(model, p.alias_of, is_buffer=p.is_buffer), is_buffer=p.is_buffer)
            tensors[p.name] = tensors[p.alias_of]
    return model


def get_tensor(model: torch.nn.Module, name: str, *, is_buffer: bool) -> torch.Tensor:
    return model.get_buffer(name) if is_buffer else model.get_parameter(name)


def shard_of(full: torch.Tensor, p: ParamPlan) -> torch.Tensor:
    """The rank's local tensor of ``p`` cut from the full one (zero padding where the shard has some)."""
    local = torch.zeros(p.shape, dtype=full.dtype, device=full.device)
    at = 0
    for start, length in p.shard.pieces:
        local.narrow(p.shard.dim, at, length).copy_(full.narrow(p.shard.dim, start, length))
        at += length
    return local
