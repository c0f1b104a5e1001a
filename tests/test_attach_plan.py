"""Ranks start without a plan and get it by ``attach``; bad input fails before anything starts."""

from __future__ import annotations

import os

import pytest

import orchestrator
from tests import checkpoints
from tests.conftest import wait_until_clean
from workers.rank_worker import RankWorker


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)
    return path, checkpoints.reference(path).state_dict()


def test_bad_path_fails_before_anything_starts(ray_cluster, tmp_path):
    with pytest.raises(orchestrator.ConfigError, match="no such file or folder"):
        orchestrator.load(str(tmp_path / "missing"), tp=2, nodes=2, progress=False)
    assert wait_until_clean(timeout_s=0.5) == ([], [])


def test_worker_without_a_plan(ckpt):
    path, oracle = ckpt
    plan = orchestrator.plan(path, tp=2)
    paths = {f.name: os.path.join(path, f.name) for f in plan.files}
    workers = [RankWorker(None, r) for r in range(2)]
    with pytest.raises(RuntimeError, match="rank 0: no plan attached; call attach"):
        workers[0].load(paths)
    for w in workers:
        w.attach(plan)
        w.load(paths)
    with pytest.raises(RuntimeError, match="rank 1: a plan is already attached"):
        workers[1].attach(plan)
    from workers.assemble import assemble_state_dict

    for w in workers:
        w.finalize()
    checkpoints.assert_state_equal(assemble_state_dict(plan, {w.rank: w.local_state() for w in workers}), oracle)
