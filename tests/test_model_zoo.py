"""A fixed sample of the model zoo (``benchmarks/model_zoo.py``, whose full matrix is docs/MODELS.md), on the
shared cluster: tiny random models of transformers' own config classes, loaded at tp=2 and pp=2 over 2 nodes,
state bit-exact and logits within 1e-4 of ``from_pretrained`` — or refused at plan time, as the matrix says."""

from __future__ import annotations

import pytest

from benchmarks import model_zoo

pytestmark = pytest.mark.cluster

# model type → expected outcome at (tp=2, pp=1) and (tp=1, pp=2): MLA attention with MoE and shared
# experts; a fused query_key_value projection with partial rotary; per-layer head counts (tp refused).
SAMPLE = {
    "deepseek_v3": ("works", "works"),
    "gpt_neox": ("works", "works"),
    "dots3_note_text": ("refused", "works"),
}


@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_zoo_sample(ray_cluster, tmp_path, model_type):
    arch = next(a for a in model_zoo.architectures() if a.model_type == model_type)
    folder = str(tmp_path / model_type)
    state, logits = model_zoo.write_checkpoint(arch, folder)
    outcomes = [model_zoo.check(folder, tp=tp, pp=pp, state=state, logits=logits, timeout_s=300)
                for tp, pp in model_zoo.TOPOLOGIES]
    assert tuple(o.status for o in outcomes) == SAMPLE[model_type], [o.detail for o in outcomes]
    for o in outcomes:
        if o.status == "refused":
            assert "PlanError" in o.detail and "use tp=1" in o.detail


def test_zoo_covers_transformers_tp_plans():
    """The zoo's list is transformers' own: every causal-LM class whose config declares a TP plan."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = {a.model_type for a in model_zoo.architectures()}
    declared = {t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t in CONFIG_MAPPING and CONFIG_MAPPING[t].base_model_tp_plan}
    assert declared <= types and {"gpt2", "llama", "bert"} <= types
