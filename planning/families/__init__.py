"""The family registry: one module per model family meshload adds knowledge for, in one table.

``FAMILIES`` lists them; ``family_of(model_type)`` finds a config's. A new family is one module here
(a ``FAMILY = Family(...)``, see ``planning.families.family``), one line in ``FAMILIES``, and its test.
Names of attention projections are matched in every model, not only their family's: transformers'
own families share these spellings (``COMMON_*``) and a module called like another family's fused
projection is one.

Pure data; read by planning (``planning.tp_plans``, ``planning.tp_styles``, ``planning.conversions``) on
the driver and by the TP runtime (``workers.tp_runtime``) on every rank.
"""

from __future__ import annotations

from planning.families import bert, gpt2, inkling, phi3
from planning.families.family import Family

FAMILIES: tuple[Family, ...] = (bert.FAMILY, gpt2.FAMILY, inkling.FAMILY, phi3.FAMILY)

# Attention projection names of transformers' own families (Llama's q_proj, Falcon's and GPT-NeoX's fused
# query_key_value, MPT's Wqkv, ...), matched in every model.
COMMON_QUERY_NAMES = frozenset({"q_proj", "q", "wq"})
COMMON_KV_NAMES = frozenset({"k_proj", "v_proj", "k", "v", "wk", "wv"})
COMMON_FUSED_ATTENTION_NAMES = frozenset({"query_key_value", "Wqkv"})


def _by_model_type() -> dict[str, Family]:
    out: dict[str, Family] = {}
    for family in FAMILIES:
        for model_type in family.model_types:
            if model_type in out:
                raise ValueError(f"model_type {model_type!r} is registered by two families")
            out[model_type] = family
    return out


BY_MODEL_TYPE: dict[str, Family] = _by_model_type()


def family_of(model_type: str) -> Family | None:
    """The family registered for ``model_type``, or None (transformers' declarations are used as they are)."""
    return BY_MODEL_TYPE.get(model_type)


QUERY_NAMES: frozenset[str] = COMMON_QUERY_NAMES.union(*(f.query_names for f in FAMILIES))
KV_NAMES: frozenset[str] = COMMON_KV_NAMES.union(*(f.kv_names for f in FAMILIES))
FUSED_ATTENTION_NAMES: frozenset[str] = COMMON_FUSED_ATTENTION_NAMES.union(*(f.fused_attention_names for f in FAMILIES))
HEAD_COUNT_ATTRS: tuple[str, ...] = tuple(dict.fromkeys(a for f in FAMILIES for a in f.head_count_attrs))
