"""Run one pipeline stage of a transformers model with transformers' own forward.

A stage holds a contiguous run of layers (plus the embeddings on the first stage and the final norm
and head on the last). We still call the full model's forward — so masks, rotary embeddings, caches
and scaling are computed exactly as transformers does — but:

- layers of other stages become pass-throughs that only advance the KV cache's length bookkeeping
  (a 1-element key/value per token), so masks and positions on every stage see the true length;
- on later stages, the embedding modules become a zero source of the right shape and dtype, and a
  pre-hook on the first owned layer swaps in the activation received from the previous stage;
- on earlier stages, a hook on the last owned layer stops the forward and returns its output.

Runs on every rank of a pipeline-parallel load (and trivially, as the whole model, when pp == 1).
"""

from __future__ import annotations

import inspect

import torch

from planning.pipeline import layer_of
from planning.plan import LoadPlan, RankPlan
from planning.skeleton import parse_dtype


class _StageOutput(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("stage finished")
        self.hidden = hidden


class CachePassthrough(torch.nn.Module):
    """Stands in for a layer of another stage: returns its input, keeps the cache length right."""

    def __init__(self, layer_idx: int, *, like: torch.nn.Module | None = None) -> None:
        super().__init__()
        if like is not None:  # the model's forward may read the layer's plain attributes (e.g. attention_type)
            for key, value in vars(like).items():
                if not key.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                    setattr(self, key, value)
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache")  # transformers >= 5.24; "past_key_values" before
        if cache is None:
            cache = kwargs.get("past_key_values")
        layers = getattr(cache, "layers", None)
        if layers is not None and self.layer_idx < len(layers) and not hasattr(layers[self.layer_idx], "update"):
            return hidden_states  # a recurrent (linear-attention, SSM) layer: its state has no length to keep
        if cache is not None and hasattr(cache, "update"):
            b, t = hidden_states.shape[0], hidden_states.shape[1]
            stub = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(stub, stub, self.layer_idx)
        return hidden_states


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword transformers' forward takes the KV cache by: ``cache`` since transformers 5.24
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ZeroHidden(torch.nn.Module):
    """Stands in for the embeddings on later stages: zeros shaped like the embeddings' output."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.weight = torch.empty(0, dtype=dtype, device=device)  # for forwards that read embed_tokens.weight.device

    def forward(self, *args, **kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")[..., 0]
        return torch.zeros(*ids.shape, self.hidden_size, dtype=self.dtype, device=ids.device)


def _top_modules(model: torch.nn.Module, names: set[str]) -> list[str]:
    """The highest modules whose every state tensor is in ``names`` (non-persistent buffers don't count)."""
    owned: dict[str, bool] = {}
    for mod_name, module in model.named_modules():
        tensors = [f"{mod_name}.{n}".lstrip(".") for n in module.state_dict(keep_vars=True)]
        owned[mod_name] = bool(tensors) and all(t in names for t in tensors)
    tops = []
    for mod_name, ok in owned.items():
        if not ok:
            continue
        parent = mod_name
        is_top = True
        while "." in parent:
            parent = parent.rpartition(".")[0]
            if owned.get(parent):
                is_top = False
                break
        if is_top and mod_name:
            tops.append(mod_name)
    return tops


class StageRunner:
    """Wraps the rank's local model so that ``forward`` runs exactly this rank's stage."""

    def __init__(self, model: torch.nn.Module, plan: LoadPlan, rank_plan: RankPlan) -> None:
        layers_path = plan.layers_path
        self.model = model
        self.cache_keyword = cache_argument(model)  # what forward takes the KV cache by
        self.takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        stage = plan.stages[rank_plan.stage]
        self.first, self.last = stage.first, stage.last
        self._incoming: torch.Tensor | None = None
        if plan.pp == 1:
            return
        layers = model.get_submodule(layers_path)
        for i in range(len(layers)):
            if not stage.layer_start <= i < stage.layer_stop:
                layers[i] = CachePassthrough(i, like=layers[i])
        if not self.first:
            hidden = model.config.get_text_config().hidden_size
            dtype = parse_dtype(plan.dtype)
            # the rank's device: offloaded layers' parameters rest in host memory, so prefer a non-CPU one
            devices = {p.device for p in model.parameters() if p.device.type != "meta"}
            device = next((d for d in devices if d.type != "cpu"), torch.device("cpu"))
            for mod_name in _top_modules(model, _names_before_layers(model, layers_path)):
                parent, _, leaf = mod_name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, ZeroHidden(hidden, dtype, device))
            layers[stage.layer_start].register_forward_pre_hook(self._swap_in, with_kwargs=True)
        if not self.last:
            layers[stage.layer_stop - 1].register_forward_hook(self._stop)

    def _swap_in(self, module, args, kwargs):
        incoming = self._incoming
        if args:
            return (incoming, *args[1:]), kwargs
        kwargs["hidden_states"] = incoming
        return args, kwargs

    @staticmethod
    def _stop(module, args, output):
        raise _StageOutput(output[0] if isinstance(output, tuple) else output)

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Logits (last stage: the model's first output) or the activation to pass on (other stages)."""
        self._incoming = hidden
        try:
            out = self.model(input_ids=input_ids, **kwargs)
        except _StageOutput as done:
            return done.hidden
        finally:
            self._incoming = None
        return out[0]


def _names_before_layers(model: torch.nn.Module, layers_path: str) -> set[str]:
    names, seen_layer = set(), False
    for name in model.state_dict(keep_vars=True):
        if layer_of(name, layers_path) is not None:
            seen_layer = True
        elif not seen_layer:
            names.add(name)
    return names
