"""What meshload knows about one model family beyond transformers' own declarations.

transformers declares, per family, a tensor-parallel plan (``base_model_tp_plan``, a head model's
``_tp_plan``) and checkpoint conversions (``conversion_mapping``); meshload uses those as they are. A
``Family`` holds only what they lack or get wrong for sharded loading and inference: plan entries that
replace or complete transformers' (keys relative to the base model, transformers' spelling), head plans
per model class, conversions for layouts transformers does not declare (its own ``WeightRenaming`` /
``WeightConverter`` classes), the names of attention projections sharded by heads (separate and fused),
and the attention attributes sized by heads that the ranks set to their local counts.

Each family is one module of ``planning.families`` registered in its table. Pure data; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType({k: (_frozen(v) if isinstance(v, Mapping) else v) for k, v in mapping.items()})


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    """One family's additions (see the module docstring); every field is optional but ``model_types``."""

    model_types: tuple[str, ...]  # the config.model_type values this file covers
    tp_plan: Mapping[str, str] = field(default_factory=dict)  # base-model-relative glob → style; replaces transformers' key
    head_plans: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # model class name → head entries (full names)
    conversions: tuple[Any, ...] = ()  # transformers' WeightRenaming / WeightConverter, for layouts it does not declare
    query_names: frozenset[str] = frozenset()  # module names of query projections (sharded by query heads)
    kv_names: frozenset[str] = frozenset()  # module names of key/value projections (by KV heads, replicated past them)
    fused_attention_names: frozenset[str] = frozenset()  # module names of fused q/k/v projections
    head_count_attrs: tuple[str, ...] = ()  # attention attributes holding a head count × head_dim, set to the local one

    def __post_init__(self) -> None:
        if not self.model_types:
            raise ValueError("a Family needs at least one model_type")
        object.__setattr__(self, "tp_plan", _frozen(self.tp_plan))
        object.__setattr__(self, "head_plans", _frozen(self.head_plans))
