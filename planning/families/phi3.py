"""Phi-3: transformers declares its fused ``qkv_proj`` and ``gate_up_proj`` ``colwise_gather_output``
(every rank holds the whole fused weight); shard each part instead: query/key/value by heads, gate and up
in two equal parts. Tested by tests/test_families.py (phi3) and tests/test_family_registry.py."""

from planning.families.family import Family

FAMILY = Family(
    model_types=("phi3",),
    tp_plan={
        "embed_tokens": "embedding_rowwise",
        "layers.*.self_attn.qkv_proj": "packed_colwise:qkv",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_up_proj": "packed_colwise",
        "layers.*.mlp.down_proj": "rowwise",
    },
    fused_attention_names=frozenset({"qkv_proj"}),
)
