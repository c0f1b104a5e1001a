"""The model skeleton: a meta-device transformers model and what planning needs to know about it.

``build_meta_model`` turns ``config.json`` into the transformers model class named by
``config.architectures`` (or ``model_class``) on ``torch.device("meta")``: no weight memory, no I/O.
A config that cannot be built fails here, naming the config and the values. ``describe`` then lists
every parameter and persistent buffer (name, shape, dtype, owning module and its type), the tie
groups transformers declares (``_tied_weights_keys`` + ``tie_word_embeddings``), the attention head
layout and the repeated-layer list that pipeline stages split.

Runs on the driver (planning) and on every rank (the same meta model is the starting point of the
rank's local model), so both see exactly the same module tree. torch is imported by the functions that
use it: the plain-data classes here are part of a ``LoadPlan``, which a driver reusing a cached plan
handles without importing torch.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from planning.errors import ConfigError, PlanError

if TYPE_CHECKING:
    import torch

    from planning.quantization import Quantization

_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A parameter or persistent buffer of the model, as transformers' ``state_dict`` names it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name
    module: str  # owning module path ("" for the root)
    module_type: str  # class name of the owning module, e.g. "Linear", "Conv1D", "Embedding"
    is_buffer: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class HeadLayout:
    """Attention head counts of the text model; what head-aware TP sharding needs."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Skeleton:
    """Everything planning reads off the meta model. Built by ``describe``; plain data, no torch modules."""

    class_name: str
    model_type: str
    base_model_prefix: str
    dtype: str
    tensors: tuple[TensorSpec, ...]
    ties: dict[str, str]  # target → source, transformers' ``all_tied_weights_keys``
    layers_path: str | None  # module path of the repeated-layer ModuleList, e.g. "model.layers"
    num_layers: int
    heads: HeadLayout | None
    heads_vary: bool = False  # head counts differ per layer (heterogeneous config): no single HeadLayout
    by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {t.name: t for t in self.tensors})


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16', 'float32' or 'auto'")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_from_dict(config_dict: dict[str, Any], *, source: str = "config.json") -> Any:
    """A transformers config object from the parsed ``config.json``; unknown model types fail clearly."""
    from transformers import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    if not model_type:
        raise ConfigError(f"{source}: no 'model_type'; cannot tell which transformers model this is")
    if "auto_map" in config_dict and model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"{source}: model_type {model_type!r} needs custom code from the repository (auto_map); meshload does not "
            f"run remote code"
        )
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{source}: model_type {model_type!r} is not known to this transformers version")
    cls = CONFIG_MAPPING[model_type]
    try:
        # save_pretrained writes infinities and NaN as {"__float__": "Infinity"}; decoded as from_pretrained does
        return cls.from_dict(cls._decode_special_floats(dict(config_dict)))
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise several unrelated types
        cause = exc.__cause__ or exc
        raise ConfigError(f"{source}: invalid {model_type} config: {cause}") from None


def model_class_for(config: Any, model_class: str | None = None, *, source: str = "config.json") -> type:
    """The transformers class to build: ``model_class`` if given, else ``config.architectures[0]``."""
    import transformers

    name = model_class or (config.architectures or [None])[0]
    if name is None:
        raise ConfigError(
            f"{source}: no 'architectures' entry; pass model_class= (e.g. 'LlamaForCausalLM' or 'BertModel')"
        )
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ConfigError(f"{source}: architecture {name!r} is not a transformers model class")
    return cls


# transformers' auto classes a config without ``architectures`` may be meant for, in order of preference.
_AUTO_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES")


def choose_model_class(config: Any, checkpoint_keys, *, source: str = "config.json") -> str | None:
    """The class to build when ``config.json`` names none (``architectures``): of the model type's auto
    classes (causal LM, masked LM, base model), the one whose tensors the checkpoint fills most, the base-model
    prefix added or stripped as ``from_pretrained`` does; on a tie, the one leaving fewest parameters
    initialised, then the first. ``None`` when ``architectures`` names the class (it is used as is)."""
    if config.architectures:
        return None
    import torch
    import transformers
    from transformers.models.auto import modeling_auto

    keys = set(checkpoint_keys)
    best: tuple[tuple[int, int], str] | None = None
    for mapping in _AUTO_MAPPINGS:
        name = getattr(modeling_auto, mapping).get(config.model_type)
        name = name[0] if isinstance(name, (list, tuple)) else name
        cls = getattr(transformers, name, None) if name else None
        if cls is None:
            continue
        try:
            with _BUILD_LOCK, torch.device("meta"):
                model = cls._from_config(config)
        except Exception:  # noqa: BLE001 - a class this config cannot build is simply not a candidate
            continue
        prefix = model.base_model_prefix
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})

        def stored(name: str) -> bool:
            stripped = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else None
            return name in keys or f"{prefix}.{name}" in keys or stripped in keys

        state = list(model.state_dict())
        filled = sum(1 for n in state if stored(n))
        missing = sum(1 for n, _ in model.named_parameters() if not stored(n) and n not in tied)
        score = (filled, -missing)
        if best is None or score > best[0]:
            best = (score, name)
    if best is None:
        raise ConfigError(f"{source}: no 'architectures' entry and no transformers class for model_type "
                          f"{config.model_type!r}; pass model_class= (e.g. 'LlamaForCausalLM' or 'BertModel')")
    return best[1]


def _global(config: Any, name: str):
    """``config.<name>``, or None when the config has no single value for it (heterogeneous configs keep
    some sizes per layer, and transformers refuses to answer for the whole model)."""
    try:
        return getattr(config, name, None)
    except RuntimeError as exc:  # transformers' AmbiguousGlobalPerLayerAttributeError
        if "per-layer" in str(exc):
            return None
        raise


def _per_layer(config: Any, name: str) -> bool:
    """Whether ``config`` keeps ``name`` per layer (no single value for the whole model)."""
    try:
        getattr(config, name, None)
    except RuntimeError as exc:
        return "per-layer" in str(exc)
    return False


def check_config(config: Any, *, source: str = "config.json") -> None:
    """Fail-fast checks transformers does not do itself, with the values in the message."""
    text = config.get_text_config()
    hidden = _global(text, "hidden_size")
    heads = _global(text, "num_attention_heads")
    kv = _global(text, "num_key_value_heads") or heads
    head_dim = _global(text, "head_dim")
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
        value = _global(text, name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{source}: {name}={value!r} must be a positive integer")
    if hidden and heads and head_dim is None and hidden % heads:
        raise ConfigError(
            f"{source}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})"
        )
    if heads and kv and heads % kv:
        raise ConfigError(
            f"{source}: num_attention_heads ({heads}) is not divisible by num_key_value_heads ({kv})"
        )


def check_attention(cls: type, attn_implementation: str | None) -> None:
    """An explicit attention implementation the class does not declare support for is refused, naming the class
    (transformers' own flags, ``_supports_sdpa`` / ``_supports_flash_attn``); ``None`` lets transformers choose."""
    supported = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}
    flag = supported.get(attn_implementation or "")
    if flag is not None and not getattr(cls, flag, False):
        fallback = "'sdpa' or 'eager'" if getattr(cls, "_supports_sdpa", False) else "'eager'"
        raise PlanError(
            f"attn_implementation={attn_implementation!r}: {cls.__name__} does not support it; pass "
            f"attn_implementation={fallback}, or leave it unset for transformers' choice (sdpa where the class "
            f"supports it, else eager)"
        )


def build_meta_model(
    config: Any,
    *,
    model_class: str | None = None,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    source: str = "config.json",
    quantization: Quantization | None = None,
) -> torch.nn.Module:
    """Instantiate the model on the meta device (no memory, no I/O, no weight init).

    ``quantization`` (a pre-quantized checkpoint's): the modules are replaced by transformers' own
    quantizer as ``from_pretrained`` replaces them (``planning.quantization``).

    ``attn_implementation``: ``None`` for transformers' default (sdpa where the class supports it,
    else eager), or an explicit one, refused if the class cannot honour it. Flash attention is only
    checked here; it is switched on later, on the workers (the model is built with the default).
    """
    import torch

    cls = model_class_for(config, model_class, source=source)
    check_config(config, source=source)
    check_attention(cls, attn_implementation)
    build_with = None if attn_implementation == "flash_attention_2" else attn_implementation
    try:
        # transformers sets torch's process-wide default dtype (and patches init functions) while it
        # builds; two builds at once in one process (a rank's background skeleton, several ranks in a
        # test) would restore each other's state wrongly, so builds take turns.
        with _BUILD_LOCK, torch.device("meta"):
            model = cls._from_config(config, dtype=dtype, attn_implementation=build_with)
    except (ValueError, TypeError, AttributeError, IndexError, ZeroDivisionError, RuntimeError) as exc:
        raise ConfigError(f"{source}: cannot build {cls.__name__} from this config: {exc}") from None
    if quantization is not None:
        from planning.quantization import apply_quantizer

        with _BUILD_LOCK:
            apply_quantizer(model, quantization)
    model.eval()
    return model


def attention_of(model: torch.nn.Module) -> str:
    """The attention implementation transformers set up for ``model`` (its choice when none was requested)."""
    chosen = getattr(model.config, "_attn_implementation", None)
    return chosen if isinstance(chosen, str) and chosen else "eager"


def _head_layout(config: Any) -> HeadLayout | None:
    text = config.get_text_config()
    heads = _global(text, "num_attention_heads")
    hidden = _global(text, "hidden_size")
    if not heads or not hidden:
        return None
    kv = _global(text, "num_key_value_heads") or heads
    head_dim = _global(text, "head_dim") or hidden // heads
    return HeadLayout(num_heads=heads, num_kv_heads=kv, head_dim=head_dim)


def _find_layers(model: torch.nn.Module) -> tuple[str | None, int]:
    """The repeated-layer list: the ModuleList named in the pp plan, else the largest ModuleList."""
    import torch

    modules = dict(model.named_modules())
    for key in getattr(model, "_pp_plan", None) or {}:
        if isinstance(modules.get(key), torch.nn.ModuleList):
            return key, len(modules[key])
    best, best_size = None, 0
    for name, module in modules.items():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    return best, (len(modules[best]) if best is not None else 0)


class _FirstLayer(Exception):
    """Raised by the first repeated layer's forward hook: the trace has what it needs."""


@dataclass(frozen=True, slots=True)
class FirstLayerTrace:
    """What the meta forward shows up to the first repeated layer (see ``trace_first_layer``)."""

    before: tuple[str, ...] | None  # modules holding tensors called before the first layer, in call order
    extra_outputs: int | None  # tensors a layer returns besides the hidden state (handed to the next layer)


def trace_first_layer(model: torch.nn.Module, layers_path: str) -> FirstLayerTrace:
    """Run the meta model's forward on a meta input (shapes only) through its first repeated layer, noting
    which modules run before it and what the layer returns. A part the meta forward cannot reach is None
    (a forward that needs real data or other inputs)."""
    import torch

    layers = model.get_submodule(layers_path)
    if not len(layers):
        return FirstLayerTrace(None, None)
    called: list[str] = []
    seen: dict[str, object] = {}

    def record(name: str):
        return lambda module, args: called.append(name)

    def entered(module, args):
        seen["before"] = tuple(called)

    def returned(module, args, output):
        seen["output"] = output
        raise _FirstLayer

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
             if n and not n.startswith(layers_path + ".") and next(iter(m.parameters(recurse=False)), None) is not None]
    hooks += [layers[0].register_forward_pre_hook(entered), layers[0].register_forward_hook(returned)]
    try:
        with _BUILD_LOCK, torch.no_grad(), torch.device("meta"):
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    except Exception:  # noqa: BLE001 - _FirstLayer, or a forward meta tensors cannot run: keep what was seen
        pass
    finally:
        for h in hooks:
            h.remove()
    extra = None
    if "output" in seen:
        out = seen["output"]
        extra = sum(1 for x in out[1:] if isinstance(x, torch.Tensor)) if isinstance(out, tuple) else 0
    return FirstLayerTrace(seen.get("before"), extra)


def _fp32_overrides(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Module name fragments transformers keeps in float32 for this dtype (``_keep_in_fp32_modules*``)."""
    import torch

    keep: list[str] = []
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return keep


def describe(model: torch.nn.Module, *, dtype: torch.dtype) -> Skeleton:
    """Read a meta model into a ``Skeleton`` (plain data)."""
    import torch

    modules = dict(model.named_modules())
    keep_fp32 = _fp32_overrides(model, dtype)
    fp32_re = re.compile("|".join(rf"(^|\.){re.escape(k)}(\.|$)" for k in keep_fp32)) if keep_fp32 else None
    state = model.state_dict(keep_vars=True)
    buffers = {name for name, _ in model.named_buffers()}
    tensors = []
    for name, tensor in state.items():
        module, _, _ = name.rpartition(".")
        tensor_dtype = tensor.dtype
        if fp32_re is not None and tensor_dtype.is_floating_point and fp32_re.search(name):
            tensor_dtype = torch.float32
        tensors.append(
            TensorSpec(
                name=name,
                shape=tuple(tensor.shape),
                dtype=dtype_name(tensor_dtype),
                module=module,
                module_type=type(modules[module]).__name__,
                is_buffer=name in buffers,
            )
        )
    layers_path, num_layers = _find_layers(model)
    text = model.config.get_text_config()
    return Skeleton(
        class_name=type(model).__name__,
        model_type=model.config.model_type,
        base_model_prefix=model.base_model_prefix,
        dtype=dtype_name(dtype),
        tensors=tuple(tensors),
        ties=dict(getattr(model, "all_tied_weights_keys", None) or {}),
        layers_path=layers_path,
        num_layers=num_layers,
        heads=_head_layout(model.config),
        heads_vary=any(_per_layer(text, n) for n in ("num_attention_heads", "num_key_value_heads", "head_dim")),
    )


def flash_attention_available() -> bool:
    """Whether flash-attn can be imported here, checked without importing it."""
    return importlib.util.find_spec("flash_attn") is not None
