"""Offload under TP and PP on the shared Ray cluster: every rank of a tp=2, pp=2 load keeps one layer on its
device, one in host memory and two on disk; logits and greedy tokens equal the fully-resident load's bit
for bit (and transformers' own)."""

from __future__ import annotations

import pytest
import torch

import orchestrator
from planning.offload import layer_tiers
from tests import checkpoints

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("llama6")), tied=True, num_hidden_layers=LAYERS)


LAYERS = 8
STAGES = {"model.embed_tokens": 0, "model.norm": 1, "lm_head": 1} | {f"model.layers.{i}": i // 4 for i in range(LAYERS)}


def test_tp_pp_offload_streams_and_matches_the_resident_load(ray_cluster, ckpt):
    resident = orchestrator.plan(ckpt, tp=2, pp=2, nodes=2, device_map=STAGES)
    budgets = {}
    for r in resident.ranks:
        layer = sum(p.nbytes for p in r.params if p.name.startswith(f"model.layers.{4 * r.stage}."))
        staying = r.param_bytes - 4 * layer
        budgets[r.rank] = {"device": staying + 3 * layer, "cpu": layer}  # one layer resident, room to stream two
    with orchestrator.load(ckpt, tp=2, pp=2, nodes=2, device_map=STAGES, max_memory=budgets) as m:
        for r in m.plan.ranks:
            s = 4 * r.stage
            assert layer_tiers(r, m.plan.layers_path) == {"device": [s], "cpu": [s + 1], "disk": [s + 2, s + 3]}
        kinds = [set(p.values()) for p in m._group.call("placement")]
        assert all({"device", "cpu", "disk:checkpoint", "disk:own"} == k for k in kinds), kinds  # o_proj: strided
        logits = m.logits(checkpoints.PROMPT)
        tokens = m.generate(checkpoints.PROMPT, max_new_tokens=4)
        state = m.full_state_dict()
        for stats in m._group.call("offload_stats"):  # five forwards, each streaming the three offloaded layers
            assert stats["streamed_bytes"] >= 5 * (stats["cpu_bytes"] + stats["disk_bytes"]) > 0, stats
    with orchestrator.load(ckpt, tp=2, pp=2, nodes=2, device_map=STAGES) as m:
        want_logits = m.logits(checkpoints.PROMPT)
        want_tokens = m.generate(checkpoints.PROMPT, max_new_tokens=4)
    assert torch.equal(logits, want_logits)
    assert torch.equal(tokens, want_tokens)
    reference = checkpoints.reference(ckpt)
    checkpoints.assert_state_equal(state, reference.state_dict())
    ref_logits, ref_tokens = checkpoints.expected_outputs(reference, max_new_tokens=4)
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert torch.equal(tokens, ref_tokens)
