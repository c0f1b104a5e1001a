"""``LoadedModel.update_weights``: another checkpoint of the same model read into the ranks' existing
storage — bit for bit what a fresh load of it gives (state and logits), every parameter at the same
address, the KV cache dropped, a rank dying meanwhile restored; a checkpoint a fresh load would plan
otherwise refused before anything changes."""

from __future__ import annotations

import os

import pytest
import torch

import orchestrator
from planning.errors import PlanError
from tests import checkpoints, fault_workers
from tests.conftest import wait_until_clean


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Step 0 and step 1 of a run: the same tied Llama with other values, in other shards (other files and offsets)."""
    base = tmp_path_factory.mktemp("steps")
    step0 = checkpoints.llama(str(base / "step0"), tied=True, seed=0)
    step1 = checkpoints.llama(str(base / "step1"), tied=True, seed=1, shard="30KB")
    return step0, step1


def _addresses(ctx) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in ctx.module.named_parameters() if t.device.type != "meta"}


# -- in one process (no Ray) ----------------------------------------------------------------------------
@pytest.mark.parametrize("zero_copy", [True, False])
def test_reload_reads_into_the_existing_storage_and_drops_the_cache(ckpts, zero_copy):
    from workers.sources import resolve_model
    from planning.retarget import retarget_plan
    from workers.rank_worker import RankWorker

    step0, step1 = ckpts
    plan = orchestrator.plan(step0)
    worker = RankWorker(plan, 0, zero_copy=zero_copy)
    worker.load({f.name: os.path.join(step0, f.name) for f in plan.files})
    worker.finalize()
    worker.init_inference("127.0.0.1", 0, backend="gloo", collective_timeout_s=60)
    worker.forward_step(checkpoints.PROMPT, use_cache=True)
    assert worker.cache is not None
    before = {n: t.data_ptr() for n, t in worker.model.named_parameters()}
    assert bool(worker._mapped) == zero_copy  # some tensors are maps of step 0's files (or none are)

    new_plan = retarget_plan(plan, resolve_model(step1))
    read = worker.reload(new_plan, {f.name: os.path.join(step1, f.name) for f in new_plan.files})

    assert read == new_plan.ranks[0].read_bytes
    assert worker.cache is None
    assert {n: t.data_ptr() for n, t in worker.model.named_parameters()} == before
    want = checkpoints.state_of(step1)
    got = {n: t for n, t in worker.model.state_dict().items() if n in want}
    checkpoints.assert_state_equal(got, want)


def test_retargeted_plan_is_a_fresh_plan_of_the_new_checkpoint(ckpts):
    from workers.sources import resolve_model
    from planning.retarget import retarget_plan

    step0, step1 = ckpts
    old = orchestrator.plan(step0, tp=2, pp=2, nodes=2)
    assert retarget_plan(old, resolve_model(step1)) == orchestrator.plan(step1, tp=2, pp=2, nodes=2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: {**s, "model.norm.weight": s["model.norm.weight"][:-1]},
         r"model\.norm\.weight: tensor 'model\.norm\.weight' is float32 \[31\], the loaded model's was float32 \[32\]"),
        (lambda s: {**s, "model.norm.weight": s["model.norm.weight"].bfloat16()},
         r"tensor 'model\.norm\.weight' is bfloat16 \[32\], the loaded model's was float32 \[32\]"),
        (lambda s: {k: v for k, v in s.items() if k != "model.layers.1.mlp.up_proj.weight"},
         r"rank 0, model\.layers\.1\.mlp\.up_proj\.weight: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is not in the checkpoint"),
        (lambda s: {**s, "lm_head.weight": s["model.embed_tokens.weight"].clone()},
         r"tensor\(s\) \['lm_head\.weight'\] would be loaded by a fresh load but are not part of the loaded model's plan"),
    ],
    ids=["shape", "dtype", "missing", "new tensor"],
)
def test_a_checkpoint_a_fresh_load_would_plan_otherwise_is_refused(ckpts, tmp_path, change, message):
    from workers.sources import resolve_model
    from planning.retarget import retarget_plan

    step0, _ = ckpts
    other = checkpoints.rewrite(step0, str(tmp_path / "other"), change)
    with pytest.raises(PlanError, match=message):
        retarget_plan(orchestrator.plan(step0, tp=2), resolve_model(other))


def test_another_config_is_refused(ckpts, tmp_path):
    import json

    from workers.sources import resolve_model
    from planning.retarget import retarget_plan

    step0, _ = ckpts
    other = checkpoints.rewrite(step0, str(tmp_path / "other"), lambda s: s)
    with open(os.path.join(other, "config.json")) as f:
        config = json.load(f)
    config["rms_norm_eps"] = 0.5
    config["transformers_version"] = "0.0.1"  # written by save_pretrained: may differ
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(PlanError, match=r"its config.json differs in \['rms_norm_eps'\] \(rms_norm_eps: 1e-06 -> 0\.5\)"):
        retarget_plan(orchestrator.plan(step0), resolve_model(other))


# -- on a cluster ---------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_update_weights_equals_a_fresh_load_in_place(ray_cluster, ckpts, tmp_path):
    step0, step1 = ckpts
    reference = checkpoints.reference(step1)
    logits1, tokens1 = checkpoints.expected_outputs(reference, max_new_tokens=3)
    with orchestrator.load(step1, tp=2, pp=2, nodes=2, progress=False) as fresh:
        fresh_state, fresh_logits = fresh.full_state_dict(), fresh.logits(checkpoints.PROMPT)
    # tied embeddings across 2 stages: stage 1 receives lm_head from stage 0, into its own storage
    with orchestrator.load(step0, tp=2, pp=2, nodes=2, progress=False) as m:
        old_logits = m.logits(checkpoints.PROMPT)
        before = m.run(_addresses)
        bad = checkpoints.rewrite(step1, str(tmp_path / "bad"), lambda s: {k: v for k, v in s.items() if "layers.2" not in k})
        with pytest.raises(PlanError, match="is not in the checkpoint"):
            m.update_weights(bad)
        assert m.alive and torch.equal(m.logits(checkpoints.PROMPT), old_logits)  # refused before anything changed

        update = m.update_weights(step1)

        assert m.run(_addresses) == before  # not one parameter moved
        assert update.bytes_read == tuple(r.read_bytes for r in m.plan.ranks)  # each rank read its own bytes
        assert m.plan.model.source == step1 and update.source == step1
        checkpoints.assert_state_equal(m.full_state_dict(), fresh_state)
        checkpoints.assert_state_equal(m.full_state_dict(), checkpoints.state_of(step1))
        assert torch.equal(m.logits(checkpoints.PROMPT), fresh_logits)
        checkpoints.assert_inference_matches(m, logits1, tokens1)
        m.update_weights(step0)  # and back
        assert torch.equal(m.logits(checkpoints.PROMPT), old_logits)
    assert wait_until_clean() == ([], [])


@pytest.mark.cluster
def test_a_rank_killed_while_reading_the_new_weights_is_restored(ray_cluster, ckpts, tmp_path):
    step0, step1 = ckpts
    worker = fault_workers.killed_in("update weights", str(tmp_path), victim=1)
    with orchestrator.load(step0, tp=2, nodes=2, worker_cls=worker, progress=False) as m:
        m.update_weights(step1)
        assert os.listdir(tmp_path) == ["update-weights-rank1-0"]
        assert [r.restarts for r in m.report] == [0, 1]
        checkpoints.assert_state_equal(m.full_state_dict(), checkpoints.state_of(step1))
    assert wait_until_clean() == ([], [])
