"""Real published weights (shipped inside package-index packages, see ``tests/published.py``), loaded over
the shared multi-node cluster and compared with transformers' own ``from_pretrained`` of the same folder.

- SmolLM2-135M-Instruct (Llama, 9 query / 3 KV heads, tied embeddings, bf16): tp=3 over 3 nodes and
  pp=2 over 2 nodes — state bit for bit, and the same greedy tokens for a real prompt tokenized by its
  real tokenizer; tp=2 refused at plan time, naming the 9 heads.
- all-MiniLM-L6-v2 as sentence-transformers published it (a BERT whose checkpoint still holds the
  ``embeddings.position_ids`` buffer older transformers saved): loads as transformers loads it, the
  legacy key ignored and reported as such, at tp=2 and pp=2.
"""

from __future__ import annotations

import pytest
import torch

import orchestrator
from tests import checkpoints, published

pytestmark = pytest.mark.cluster

PROMPT = "Write one sentence about the sea."
NEW_TOKENS = 8


@pytest.fixture(scope="session")
def smollm2(request):
    """(folder, transformers' state, prompt ids, transformers' greedy tokens); the folder is made once and
    kept in pytest's cache (``.pytest_cache``) for later runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = published.smollm2_folder(str(request.config.cache.mkdir("published-models")))
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": PROMPT}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    assert reference.dtype == torch.bfloat16
    tokens = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return path, reference.state_dict(), ids, tokens


def test_smollm2_tp3_over_3_nodes(ray_cluster, smollm2):
    path, state, ids, tokens = smollm2
    with orchestrator.load(path, tp=3, nodes=3, progress=False) as m:
        assert len({r.node_id for r in m.report}) == 3
        q = next(p for p in m.plan.ranks[0].params if p.name == "model.layers.0.self_attn.q_proj.weight")
        assert q.shape == (3 * 64, 576)  # 9 heads / 3 ranks
        checkpoints.assert_state_equal(m.full_state_dict(), state)
        assert torch.equal(m.generate(ids, max_new_tokens=NEW_TOKENS), tokens)
        assert m.keys.clean


def test_smollm2_pp2_over_2_nodes(ray_cluster, smollm2):
    path, state, ids, tokens = smollm2
    with orchestrator.load(path, pp=2, nodes=2, progress=False) as m:
        assert len({r.node_id for r in m.report}) == 2
        receives = [p for r in m.plan.ranks for p in r.params if p.receive_from is not None]
        assert [p.name for p in receives] == ["lm_head.weight"]  # tied: read once, sent to the last stage
        checkpoints.assert_state_equal(m.full_state_dict(), state)
        assert torch.equal(m.generate(ids, max_new_tokens=NEW_TOKENS), tokens)


def test_smollm2_tp2_is_refused_naming_the_heads(smollm2):
    with pytest.raises(orchestrator.PlanError, match=r"tp=2 does not divide num_attention_heads=9"):
        orchestrator.plan(smollm2[0], tp=2, nodes=2)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    path = published.minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["A man is playing a guitar.", "The new movie is awesome"], padding=True, return_tensors="pt")
    reference, info = AutoModel.from_pretrained(path, output_loading_info=True)
    reference.eval()
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    return path, reference.state_dict(), info, batch, hidden


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_published_sentence_transformer_with_legacy_position_ids(ray_cluster, minilm, tp, pp):
    path, state, info, batch, hidden = minilm
    plan = orchestrator.plan(path, tp=tp, pp=pp, nodes=2)
    assert plan.model.class_name == "BertModel"
    assert plan.keys.ignored == ("embeddings.position_ids",)  # the legacy buffer: ignored as transformers does
    assert plan.keys.unexpected == tuple(sorted(info["unexpected_keys"])) == ()
    assert plan.keys.missing == tuple(sorted(info["missing_keys"])) == ()
    with orchestrator.load(plan, progress=False) as m:
        checkpoints.assert_state_equal(m.full_state_dict(), state)
        got = m.logits(batch["input_ids"], attention_mask=batch["attention_mask"])
        assert (got - hidden).abs().max().item() <= 1e-4
