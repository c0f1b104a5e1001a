"""Zero-copy CPU loading: a parameter that is one contiguous range of a file in the right dtype is a
private mapping of the page cache — equal values, no memory of its own, writes never reach the file,
and anything shipped out of the rank is a real copy."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import orchestrator
from tests import checkpoints
from workers.rank_worker import RankWorker


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)


def _worker(path, rank, **kwargs):
    plan = orchestrator.plan(path, tp=2)
    worker = RankWorker(plan, rank, **kwargs)
    worker.load({f.name: os.path.join(path, f.name) for f in plan.files})
    return plan, worker


def test_contiguous_shards_are_mapped_strided_ones_copied(ckpt):
    plan, worker = _worker(ckpt, 0)
    mapped = worker._mapped
    assert "model.layers.0.self_attn.q_proj.weight" in mapped  # a dim-0 slice: one range of the file
    assert "model.layers.0.self_attn.o_proj.weight" not in mapped  # a dim-1 slice: one run per row
    assert "model.embed_tokens.weight" in mapped  # rank 0 holds vocab rows 0-50 exactly
    assert "model.embed_tokens.weight" not in _worker(ckpt, 1)[1]._mapped  # rank 1: rows 51-100 + a zero row of padding
    copied = _worker(ckpt, 0, zero_copy=False)[1]
    for name in worker.tensors:
        assert torch.equal(worker.tensors[name], copied.tensors[name]), name
    assert worker._bytes_read == copied._bytes_read == worker.rank_plan.read_bytes


def test_writes_stay_private_and_exports_are_copies(ckpt):
    plan, worker = _worker(ckpt, 1)
    name = "model.layers.1.mlp.gate_proj.weight"
    assert name in worker._mapped
    exported = worker.local_state()[name]
    before = exported.clone()
    worker.tensors[name].add_(1.0)  # copy-on-write: this rank's pages only
    assert torch.equal(exported, before), "an exported tensor must not share the mapping"
    on_disk = {}
    for f in checkpoints.files_of(ckpt):
        on_disk.update(load_file(os.path.join(ckpt, f)))
    local = on_disk[name][24:48]  # rank 1's rows of a 48-row gate_proj
    assert torch.equal(local, before) and not torch.equal(local, worker.tensors[name])
