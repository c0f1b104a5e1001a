"""Pre-quantized checkpoints: the module tree transformers builds for them, and TP shards of their scales.

A checkpoint published quantized (DeepSeek-V3/R1's and Qwen3's FP8 releases) says so in
``config.json``'s ``quantization_config``. transformers then builds a different module tree: its
quantizer replaces ``nn.Linear`` layers by ``FP8Linear`` modules whose ``weight`` is
``float8_e4m3fn`` and whose ``weight_scale_inv`` holds one float32 scale per 128×128 block of it.
meshload builds the same tree, with transformers' own quantizer (``AutoHfQuantizer``, its
``preprocess_model``), on the driver for planning and on every rank for the local model, so the
planner sees the quantized tensors as ordinary parameters and every rank reads its own bytes of each.

What only meshload has to decide is how a scale tensor is cut under tensor parallelism: a rank
holding rows ``[a, b)`` of a weight needs the scale rows ``[a / block, ceil(b / block))``, and that is
its own data only when ``a`` falls on a block boundary and ``b`` does too (or is the end of the
weight). ``block_shard`` maps a weight's shard to its scales' shard, or refuses the TP degree at plan
time, naming the tensor, the degree and the block size.

``dequantize`` (transformers' loading attribute of ``FineGrainedFP8Config``) turns each rank's FP8
shard back into the model's dtype after reading it, with transformers' own ``Fp8Dequantize`` (see
``workers.dequantize``); the plan, the bytes read and the TP checks are those of the quantized layout.

Runs on the driver (planning) and on every rank (the meta model); pure apart from transformers' imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from planning.errors import ConfigError, PlanError
from planning.shard import Shard

if TYPE_CHECKING:
    from transformers.utils.quantization_config import QuantizationConfigMixin

# quant_method → the suffix of a parameter holding the per-block scales of the parameter named without it
# (FP8Linear's ``weight`` → ``weight_scale_inv``; FP8Experts' ``gate_up_proj`` → ``gate_up_proj_scale_inv``).
SCALE_SUFFIXES: dict[str, str] = {"fp8": "_scale_inv"}
SUPPORTED_METHODS = tuple(SCALE_SUFFIXES)


@dataclass(frozen=True, slots=True)
class Quantization:
    """The quantization a plan loads with: transformers' config (as ``to_dict`` gives it, with the caller's
    loading attributes merged in as ``from_pretrained`` merges them) and what planning reads off it."""

    method: str  # transformers' quant_method, e.g. "fp8"
    block: tuple[int, int] | None  # (rows, columns) of weight per scale; None: one scale per tensor
    dequantize: bool  # read the quantized bytes, hold the model's dtype (transformers' dequantize option)
    config: dict  # transformers' QuantizationConfig.to_dict(), JSON-safe


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):  # transformers' QuantizationMethod enum
        return value.value
    return value


def quantization_of(
    config_dict: dict, *, override: QuantizationConfigMixin | dict | None = None, source: str = "config.json"
) -> Quantization | None:
    """The checkpoint's quantization (``config.json``'s ``quantization_config``), with ``override`` — a
    transformers quantization config of the same class, e.g. ``FineGrainedFP8Config(dequantize=True)``, or a
    dict of its loading attributes — merged in by transformers' own ``AutoHfQuantizer.merge_quantization_configs``.
    None for an unquantized checkpoint; a method meshload cannot slice is refused, naming it."""
    declared = config_dict.get("quantization_config")
    if declared is None:
        if override is not None:
            raise ConfigError(
                f"{source}: quantization={type(override).__name__}(...) given, but the checkpoint is not quantized; "
                f"quantizing while loading is not supported (see docs/QUANTIZED.md)"
            )
        return None
    from transformers.quantizers.auto import AutoHfQuantizer

    if not isinstance(declared, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {type(declared).__name__}")
    method = declared.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise ConfigError(
            f"{source}: quantization_config.quant_method={method!r} is not supported by meshload; supported: "
            f"{list(SUPPORTED_METHODS)} (see docs/QUANTIZED.md)"
        )
    try:
        if isinstance(override, dict):  # loading attributes only, e.g. {"dequantize": True} (``meshload --dequantize``)
            from transformers.quantizers.auto import AutoQuantizationConfig

            override = AutoQuantizationConfig.from_dict({**declared, **override})
        merged = AutoHfQuantizer.merge_quantization_configs(dict(declared), override)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: quantization_config {declared!r}: {exc}") from None
    block = getattr(merged, "weight_block_size", None)
    return Quantization(
        method=method,
        block=tuple(int(b) for b in block) if block is not None else None,
        dequantize=bool(getattr(merged, "dequantize", False)),
        config=_json_safe(merged.to_dict()),
    )


def layout_quantizer(quantization: Quantization) -> Any:
    """transformers' quantizer for a pre-quantized checkpoint, set for its layout: whatever ``dequantize`` says
    (that happens on the ranks, after the quantized bytes are read), the modules hold the quantized tensors."""
    from transformers.quantizers.auto import AutoHfQuantizer

    return AutoHfQuantizer.from_config(dict(quantization.config, dequantize=False), pre_quantized=True)


def apply_quantizer(model: Any, quantization: Quantization) -> None:
    """Replace ``model``'s modules (on the meta device) as transformers' quantizer does before loading a
    pre-quantized checkpoint (``layout_quantizer``)."""
    layout_quantizer(quantization).preprocess_model(model)


def scale_owner(name: str, quantization: Quantization | None) -> str | None:
    """The weight whose block scales parameter ``name`` holds (``...q_proj.weight_scale_inv`` → ``...q_proj.weight``,
    ``...experts.gate_up_proj_scale_inv`` → ``...experts.gate_up_proj``)."""
    if quantization is None or quantization.block is None:
        return None
    suffix = SCALE_SUFFIXES[quantization.method]
    return name.removesuffix(suffix) if name.endswith(suffix) else None


def block_shard(
    weight_shard: Shard | None, *, weight_name: str, ndim: int, block: tuple[int, int], scale_size: int, tp: int
) -> Shard | None:
    """The scale tensor's shard matching ``weight_shard`` (the last two dims are blocked ``block``), or
    ``PlanError`` when a piece of the weight starts or ends inside a block."""
    if weight_shard is None:
        return None
    dim = weight_shard.dim
    if dim < ndim - 2:  # a leading (expert) dimension: one scale grid per index, cut the same way
        return weight_shard
    size = block[0] if dim == ndim - 2 else block[1]
    if weight_shard.padding:
        raise PlanError(
            f"{weight_name}: tp={tp} pads dimension {dim} ({weight_shard.full_size} → {weight_shard.local_size} per "
            f"rank), and a quantized weight cannot be padded; keep this module unsplit (tp_plan) or use another tp"
        )
    pieces = []
    for start, length in weight_shard.pieces:
        end = start + length
        if start % size or (end % size and end != weight_shard.full_size):
            raise PlanError(
                f"{weight_name}: tp={tp} cuts dimension {dim} (size {weight_shard.full_size}) at "
                f"[{start}, {end}), which is not on the quantization block boundary (block size {size}); "
                f"every rank's slice must be a whole number of {size}-element blocks: use a tp that divides "
                f"{weight_shard.full_size // size} blocks"
            )
        pieces.append((start // size, -(-end // size) - start // size))
    local = sum(n for _, n in pieces)
    return Shard(dim=dim, pieces=tuple(pieces), local_size=local, full_size=scale_size)
