"""``LoadedModel.run``: a user's function on the ranks, with each rank's module, tensors, coordinates and
process groups; results in rank order, errors grouped naming rank and node, the model usable after a
user's error (ranks blocked behind it restored)."""

from __future__ import annotations

import pytest
import torch

import orchestrator
import orchestrator.loaded_model
from orchestrator.rank_group import RankError
from tests import checkpoints
from tests.conftest import wait_until_clean

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)
    logits, tokens = checkpoints.expected_outputs(checkpoints.reference(path), max_new_tokens=3)
    return path, logits, tokens


@pytest.fixture(scope="module")
def model(ray_cluster, ckpt):
    path, _, _ = ckpt
    with orchestrator.load(path, tp=2, pp=2, nodes=2, progress=False) as m:
        yield m
    assert wait_until_clean() == ([], [])


def test_each_rank_reports_its_own_shards_in_rank_order(model, ckpt):
    def shard_sizes(ctx):
        return ctx.rank, ctx.tp_rank, ctx.stage, str(ctx.device), {n: tuple(t.shape) for n, t in ctx.named_parameters()}

    results = model.run(shard_sizes)
    assert [r[:4] for r in results] == [(0, 0, 0, "cpu"), (1, 1, 0, "cpu"), (2, 0, 1, "cpu"), (3, 1, 1, "cpu")]
    for (rank, *_, sizes), rank_plan in zip(results, model.plan.ranks):
        want = {p.name: p.shape for p in rank_plan.params if not p.is_buffer}
        assert sizes == want, rank  # the rank's own TP slice of its own stage, nothing else
    # the TP halves of a column-split matrix are halves of transformers' own
    full = checkpoints.state_of(ckpt[0])["model.layers.0.self_attn.q_proj.weight"]
    halves = model.run(lambda ctx: ctx.params["model.layers.0.self_attn.q_proj.weight"].clone(), ranks=[0, 1])
    assert torch.equal(torch.cat(halves), full)


def test_a_collective_over_the_tp_group(model):
    def all_reduce_rank(ctx, offset, *, scale):
        import torch.distributed as dist

        x = torch.tensor([float(ctx.rank + offset) * scale])
        dist.all_reduce(x, group=ctx.tp_group)
        return x.item(), dist.get_world_size(ctx.tp_group), dist.get_world_size(ctx.world_group)

    # stage 0 holds ranks 0, 1; stage 1 ranks 2, 3: each TP group sums its own ranks
    assert model.run(all_reduce_rank, 10, scale=2.0) == [(42.0, 2, 4), (42.0, 2, 4), (50.0, 2, 4), (50.0, 2, 4)]


def test_the_module_runs_the_stage_forward_on_the_ranks(model, ckpt):
    """Every rank of stage 0 runs its module's forward together (its TP collectives work in ``run``)."""
    from transformers import AutoModelForCausalLM

    def embed(ctx, ids):
        with torch.inference_mode():
            return ctx.module.get_input_embeddings()(ids)

    want = AutoModelForCausalLM.from_pretrained(ckpt[0]).get_input_embeddings()(checkpoints.PROMPT)
    got = model.run(embed, checkpoints.PROMPT, ranks=[0, 1])
    assert torch.equal(got[0], got[1]) and torch.allclose(got[0], want.detach(), atol=1e-6)


def test_a_subset_of_ranks(model):
    assert model.run(lambda ctx: ctx.rank * 10, ranks=[3, 1]) == [10, 30]
    with pytest.raises(ValueError, match=r"ranks=\[4\]: expected rank numbers in \[0, 4\)"):
        model.run(lambda ctx: None, ranks=[4])


def test_an_error_on_one_rank_is_grouped_and_the_model_stays_usable(model, ckpt):
    def fails_on_2(ctx):
        if ctx.rank == 2:
            raise KeyError(f"no such thing on rank {ctx.rank}")
        return ctx.rank

    with pytest.raises(RankError, match=r"^\[Rank 2\] \(node 127\.0\.0\.\d\): KeyError: 'no such thing on rank 2' \[during run\]$"):
        model.run(fails_on_2)
    assert model.alive
    assert model.run(lambda ctx: ctx.rank) == [0, 1, 2, 3]
    checkpoints.assert_inference_matches(model, ckpt[1], ckpt[2])


def test_a_rank_blocked_behind_a_failed_one_is_restored(model, ckpt, monkeypatch):
    """Rank 0 waits in an all-reduce for rank 1, whose function raised: rank 0 is restarted (as after a
    death: it reads its bytes again), the error is the user's, and the model works as before."""
    monkeypatch.setattr(orchestrator.loaded_model, "INFLIGHT_GRACE_S", 3.0)

    def reduce_unless_1(ctx):
        import torch.distributed as dist

        if ctx.rank == 1:
            raise RuntimeError("rank 1 gives up")
        if ctx.stage == 0:
            dist.all_reduce(torch.ones(1), group=ctx.tp_group)
        return ctx.rank

    restarts = [r.restarts for r in model.report]
    with pytest.raises(RankError, match=r"\[Rank 1\] \(node 127\.0\.0\.\d\): RuntimeError: rank 1 gives up \[during run\]"):
        model.run(reduce_unless_1)
    assert [r.restarts - b for r, b in zip(model.report, restarts)] == [1, 0, 0, 0]
    checkpoints.assert_inference_matches(model, ckpt[1], ckpt[2])


def test_not_a_callable(model):
    with pytest.raises(TypeError, match="needs a callable fn"):
        model.run("print")
