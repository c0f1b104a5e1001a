"""Inkling: transformers declares the fused expert ``gate_up_proj`` ``colwise``, but the forward chunks it
into [gate; up] halves, so each rank needs its part of both (found by the model zoo: logits off by 5e-4 at
tp=2). Tested by tests/test_family_registry.py and the model zoo (docs/MODELS.md)."""

from planning.families.family import Family

FAMILY = Family(
    model_types=("inkling_text",),
    tp_plan={"layers.*.mlp.experts.gate_up_proj": "packed_colwise"},
)
