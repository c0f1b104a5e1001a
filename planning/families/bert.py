"""BERT and the encoders built like it (RoBERTa, XLM-RoBERTa): transformers declares no TP plan. Attention
projections are ``query``/``key``/``value`` under ``attention.self``, sized by ``all_head_size``.
Tested by tests/test_encoders.py and tests/test_family_registry.py."""

from planning.families.family import Family

FAMILY = Family(
    model_types=("bert", "roberta", "xlm-roberta"),
    tp_plan={
        "embeddings.word_embeddings": "embedding_rowwise",
        "encoder.layer.*.attention.self.query": "colwise",
        "encoder.layer.*.attention.self.key": "colwise",
        "encoder.layer.*.attention.self.value": "colwise",
        "encoder.layer.*.attention.output.dense": "rowwise",
        "encoder.layer.*.intermediate.dense": "colwise",
        "encoder.layer.*.output.dense": "rowwise",
    },
    head_plans={"BertForMaskedLM": {"cls.predictions.decoder": "colwise_gather_output"}},
    query_names=frozenset({"query"}),
    kv_names=frozenset({"key", "value"}),
    head_count_attrs=("all_head_size",),
)
