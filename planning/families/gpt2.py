"""GPT-2: transformers declares no TP plan; its ``Conv1D`` layers store weights as (in, out) and its
attention fuses query, key and value in ``c_attn`` (split by heads: ``packed_colwise:qkv``), sized by
``split_size``. Tested by tests/test_families.py (gpt2) and tests/test_family_registry.py."""

from planning.families.family import Family

FAMILY = Family(
    model_types=("gpt2",),
    tp_plan={
        "wte": "embedding_rowwise",
        "h.*.attn.c_attn": "packed_colwise:qkv",
        "h.*.attn.c_proj": "rowwise",
        "h.*.mlp.c_fc": "colwise",
        "h.*.mlp.c_proj": "rowwise",
    },
    head_plans={"GPT2LMHeadModel": {"lm_head": "colwise_gather_output"}},
    fused_attention_names=frozenset({"c_attn"}),
    head_count_attrs=("split_size",),
)
