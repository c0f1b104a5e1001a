"""Box runs against numpy, and TP shards: invariants over all ranks, GQA replication, padding, errors."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from planning.boxes import run_offsets, runs, split_dim
from planning.errors import PlanError
from planning.skeleton import HeadLayout, TensorSpec
from planning.tp_styles import shard_for


def _element_offsets(shape, box):
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    return idx[tuple(slice(a, b) for a, b in box)].reshape(-1)


@pytest.mark.parametrize("seed", range(40))
def test_runs_enumerate_the_box_in_order(seed):
    rng = random.Random(seed)
    shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
    box = []
    for n in shape:
        a = rng.randint(0, n - 1)
        box.append((a, rng.randint(a + 1, n)))
    box = tuple(box)
    r = runs(shape, box)
    offsets = run_offsets(r)
    got = (offsets[:, None] + np.arange(r.run)[None, :]).reshape(-1)
    assert np.array_equal(got, _element_offsets(shape, box))
    assert r.count == len(offsets)


def test_dim1_slice_is_one_run_per_row():
    r = runs((8, 6), ((0, 8), (3, 6)))
    assert (r.run, r.count) == (3, 8)
    assert split_dim(((0, 8), (0, 6)), (8, 6)) == 0 and runs((8, 6), ((0, 8), (0, 6))).count == 1


HEADS = HeadLayout(num_heads=8, num_kv_heads=2, head_dim=4)


def _spec(name, shape, module_type="Linear"):
    return TensorSpec(name=name, shape=shape, dtype="float32", module=name.rpartition(".")[0], module_type=module_type)


def _coverage(spec, style, tp, *, param_level=False):
    shards = [shard_for(spec, style, param_level=param_level, tp=tp, tp_rank=r, heads=HEADS) for r in range(tp)]
    count = np.zeros(spec.shape[shards[0].dim], dtype=int)
    for s in shards:
        for start, length in s.pieces:
            count[start : start + length] += 1
    return shards, count


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_query_heads_split_evenly_and_disjointly(tp):
    spec = _spec("layers.0.attn.q_proj.weight", (32, 16))
    if tp == 1:
        assert shard_for(spec, "colwise", param_level=False, tp=1, tp_rank=0, heads=HEADS) is None
        return
    shards, count = _coverage(spec, "colwise", tp)
    assert (count == 1).all()
    assert {s.local_size for s in shards} == {32 // tp}


@pytest.mark.parametrize("tp, copies", [(2, 1), (4, 2), (8, 4)])
def test_kv_heads_are_replicated_when_tp_exceeds_them(tp, copies):
    spec = _spec("layers.0.attn.k_proj.weight", (8, 16))  # 2 KV heads of dim 4
    shards, count = _coverage(spec, "colwise", tp)
    assert (count == copies).all()
    for r, s in enumerate(shards):
        q = shard_for(_spec("layers.0.attn.q_proj.weight", (32, 16)), "colwise", param_level=False, tp=tp, tp_rank=r, heads=HEADS)
        # the KV head a rank holds is the one its query heads attend with
        q_head = q.pieces[0][0] // 4
        assert s.pieces[0][0] // 4 == q_head // (8 // 2)


def test_impossible_degrees_name_the_dimension():
    with pytest.raises(PlanError, match="tp=3 does not divide num_attention_heads=8"):
        shard_for(_spec("l.q_proj.weight", (32, 16)), "colwise", param_level=False, tp=3, tp_rank=0, heads=HEADS)
    heads = HeadLayout(num_heads=12, num_kv_heads=3, head_dim=4)
    with pytest.raises(PlanError, match="tp=4 cannot split num_key_value_heads=3"):
        shard_for(_spec("l.k_proj.weight", (12, 16)), "colwise", param_level=False, tp=4, tp_rank=0, heads=heads)


@pytest.mark.parametrize("vocab, tp", [(101, 2), (101, 4), (7, 4)])
def test_vocab_padding_keeps_every_row(vocab, tp):
    spec = _spec("embed.weight", (vocab, 16), "Embedding")
    shards, count = _coverage(spec, "embedding_rowwise", tp)
    assert (count == 1).all()
    assert len({s.local_size for s in shards}) == 1  # gathered outputs need equal sizes
    assert sum(s.local_size - s.padding for s in shards) == vocab


def test_rowwise_splits_input_dim_and_keeps_bias_whole():
    w = shard_for(_spec("l.o_proj.weight", (16, 32)), "rowwise", param_level=False, tp=2, tp_rank=1, heads=HEADS)
    assert (w.dim, w.pieces) == (1, ((16, 16),))
    assert shard_for(_spec("l.o_proj.bias", (16,)), "rowwise", param_level=False, tp=2, tp_rank=1, heads=HEADS) is None


def test_packed_parts_are_sharded_per_part():
    gate_up = _spec("l.experts.gate_up_proj", (4, 20, 16), "MixtralExperts")
    shards, count = _coverage(gate_up, "packed_colwise", 2, param_level=True)
    assert shards[1].dim == 1 and shards[1].pieces == ((5, 5), (15, 5))
    assert (count == 1).all()
    qkv = _spec("l.qkv_proj.weight", (48, 16))  # 8 q heads + 2 + 2 kv heads, head_dim 4
    shards, count = _coverage(qkv, "packed_colwise:qkv", 4)
    assert shards[3].pieces == ((24, 8), (36, 4), (44, 4))
    assert (count[:32] == 1).all() and (count[32:] == 2).all()


def test_conv1d_is_transposed():
    w = shard_for(_spec("h.0.mlp.c_fc.weight", (16, 64), "Conv1D"), "colwise", param_level=False, tp=2, tp_rank=0, heads=HEADS)
    assert w.dim == 1
    w = shard_for(_spec("h.0.mlp.c_proj.weight", (64, 16), "Conv1D"), "rowwise", param_level=False, tp=2, tp_rank=0, heads=HEADS)
    assert w.dim == 0


def test_unknown_style():
    with pytest.raises(PlanError, match="unknown style 'diagonal'"):
        shard_for(_spec("l.q_proj.weight", (32, 16)), "diagonal", param_level=False, tp=2, tp_rank=0, heads=HEADS)


@pytest.mark.parametrize("n, pp", list(itertools.product([3, 5, 8], [2, 3])))
def test_balanced_cuts_are_optimal(n, pp):
    from planning.pipeline import _balanced_cuts

    rng = random.Random(n * 10 + pp)
    cost = [rng.randint(1, 20) for _ in range(n)]
    head, tail = rng.randint(0, 30), rng.randint(0, 30)
    cuts = _balanced_cuts(cost, pp, head, tail, [1] * pp)

    def worst(c):
        loads = [sum(cost[a:b]) for a, b in zip(c, c[1:])]
        loads[0] += head
        loads[-1] += tail
        return max(loads)

    best = min(
        worst([0, *inner, n]) for inner in itertools.combinations(range(1, n), pp - 1)
    )
    assert worst(cuts) == best
