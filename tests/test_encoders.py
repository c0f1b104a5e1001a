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


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """A BertForMaskedLM checkpoint and a BertModel checkpoint, both written by save_pretrained."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    config = BertConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(1)
    mlm = checkpoints.save(BertForMaskedLM(config), str(tmp_path_factory.mktemp("bert-mlm")))
    base = checkpoints.save(BertModel(config), str(tmp_path_factory.mktemp("bert-base")))
    return mlm, base


def _loaded_equal(got: dict, want: dict, initialised: tuple[str, ...]) -> None:
    """Every tensor read from the checkpoint is bit-exact; the initialised ones exist with the right shapes."""
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        if k not in initialised:
            assert torch.equal(got[k], want[k]), k


def test_base_model_from_a_masked_lm_checkpoint(ray_cluster, bert_pair):
    """``BertModel`` from a ``BertForMaskedLM`` checkpoint, as from_pretrained allows: the ``bert.`` prefix
    stripped, the MLM head not loaded and the pooler initialised, both reported as transformers reports them."""
    from transformers import BertModel

    mlm, _ = bert_pair
    reference, info = BertModel.from_pretrained(mlm, output_loading_info=True)
    reference.eval()
    with torch.no_grad():
        hidden = reference(checkpoints.PROMPT).last_hidden_state
    with orchestrator.load(mlm, tp=2, nodes=2, model_class="BertModel", progress=False) as m:
        assert m.keys.unexpected == tuple(sorted(info["unexpected_keys"]))  # cls.predictions.*
        assert m.keys.missing == tuple(sorted(info["missing_keys"])) == ("pooler.dense.bias", "pooler.dense.weight")
        state = m.full_state_dict()
        _loaded_equal(state, reference.state_dict(), m.keys.missing)
        assert torch.equal(state["pooler.dense.bias"], torch.zeros(32))  # transformers' init: zeros
        assert (m.logits(checkpoints.PROMPT) - hidden).abs().max().item() <= 1e-4


def test_masked_lm_from_a_base_model_checkpoint(ray_cluster, bert_pair):
    """The reverse: the prefix added, the pooler not loaded, the MLM head initialised — at full shape from one
    seed on every rank, then sharded (the decoder is split over the vocabulary), so the TP forward equals
    transformers' forward with the same values."""
    from transformers import BertForMaskedLM

    _, base = bert_pair
    reference, info = BertForMaskedLM.from_pretrained(base, output_loading_info=True)
    reference.eval()
    with orchestrator.load(base, tp=2, nodes=2, model_class="BertForMaskedLM", progress=False) as m:
        assert m.keys.unexpected == tuple(sorted(info["unexpected_keys"])) == ("pooler.dense.bias", "pooler.dense.weight")
        assert m.keys.missing == tuple(sorted(info["missing_keys"]))
        decoder = next(p for p in m.plan.ranks[0].params if p.name == "cls.predictions.decoder.bias")
        assert decoder.computed and decoder.shard is not None and decoder.tied_to == "cls.predictions.bias"
        state = m.full_state_dict()
        _loaded_equal(state, reference.state_dict(), m.keys.missing)
        assert torch.equal(state["cls.predictions.decoder.bias"], state["cls.predictions.bias"])  # tied, as transformers ties
        reference.load_state_dict(state)
        with torch.no_grad():
            logits = reference(checkpoints.PROMPT).logits
        assert (m.logits(checkpoints.PROMPT) - logits).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def mpnet(tmp_path_factory):
    """A small MPNet written by save_pretrained, then given the ``embeddings.position_ids`` buffer that older
    transformers versions saved in MPNet checkpoints (as published sentence-transformers MPNets have it)."""
    from transformers import AutoModel, MPNetConfig, MPNetModel

    config = MPNetConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(2)
    saved = checkpoints.save(MPNetModel(config), str(tmp_path_factory.mktemp("mpnet-saved")))
    path = checkpoints.rewrite(saved, str(tmp_path_factory.mktemp("mpnet")),
                               lambda s: {**s, "embeddings.position_ids": torch.arange(64)[None]})
    reference, info = AutoModel.from_pretrained(path, output_loading_info=True)
    reference.eval()
    with torch.no_grad():
        hidden = reference(checkpoints.PROMPT).last_hidden_state
    return path, reference.state_dict(), info, hidden


def test_mpnet_with_legacy_keys(ray_cluster, mpnet):
    path, state, info, hidden = mpnet
    plan = orchestrator.plan(path, tp=2, nodes=2)
    assert plan.attn_implementation == "eager"  # transformers' choice: MPNet has no sdpa
    assert plan.keys.ignored == ("embeddings.position_ids",) and plan.keys.clean
    assert not info["unexpected_keys"] and not info["missing_keys"]
    with orchestrator.load(plan, progress=False) as m:
        checkpoints.assert_state_equal(m.full_state_dict(), state)
        assert (m.logits(checkpoints.PROMPT) - hidden).abs().max().item() <= 1e-4


def test_mpnet_refusals_name_the_class_and_the_tensor(mpnet):
    path = mpnet[0]
    with pytest.raises(orchestrator.PlanError, match="attn_implementation='sdpa': MPNetModel does not support it; pass attn_implementation='eager'"):
        orchestrator.plan(path, attn_implementation="sdpa")
    with pytest.raises(orchestrator.PlanError, match=r"pp=2: MPNetModel stores \['encoder.relative_attention_bias.weight'\] after encoder.layer"):
        orchestrator.plan(path, pp=2, nodes=2)
