"""Base and encoder models (BERT, through its AutoModel class) at tp=2 and pp=2 over a 2-node cluster:
state bit-exact with transformers and the last hidden state within 1e-4 of its single-process forward."""

from __future__ import annotations

import pytest
import torch

import orchestrator
from tests import checkpoints

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("bert"))
    config = BertConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2)
    checkpoints.save(BertModel(config), path)
    reference = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = reference(checkpoints.PROMPT).last_hidden_state
    return path, reference.state_dict(), hidden


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_bert(ray_cluster, bert, tp, pp):
    path, state, hidden = bert
    plan = orchestrator.plan(path, tp=tp, pp=pp, nodes=2)
    assert plan.model.class_name == "BertModel"
    if tp == 2:
        query = next(p for p in plan.ranks[0].params if p.name == "encoder.layer.0.attention.self.query.weight")
        assert query.shape == (16, 32)  # meshload's BERT plan: heads split across ranks
    with orchestrator.load(plan, progress=False) as m:
        checkpoints.assert_state_equal(m.full_state_dict(), state)
        got = m.logits(checkpoints.PROMPT)
        assert (got - hidden).abs().max().item() <= 1e-4
