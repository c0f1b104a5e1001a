"""The ranks start while the driver is still planning: their process start and imports overlap the
plan; the plan is attached to them when it is ready. Planning is held back here until every rank has
started, so the overlap is certain, not a matter of timing."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

import orchestrator
import orchestrator.api
from planning.errors import ConversionError
from tests import checkpoints, fault_workers
from tests.conftest import wait_until_clean
from workers.rank_worker import RankWorker


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)
    return path, checkpoints.reference(path).state_dict()


def _plan_after_ranks_started(monkeypatch, marker_dir, ranks: int, timeout_s: float = 120.0):
    """Make ``load``'s planning wait until ``ranks`` actors exist (started without a plan)."""
    real = orchestrator.api.make_plan

    def gated(*args, **kwargs):
        deadline = time.monotonic() + timeout_s
        while len([f for f in os.listdir(marker_dir) if f.endswith("-without-plan")]) < ranks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks never started before planning: {os.listdir(marker_dir)}")
            time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(orchestrator.api, "make_plan", gated)


@pytest.mark.cluster
def test_ranks_started_before_the_plan_load_it_bit_exact(ray_cluster, ckpt, tmp_path, monkeypatch):
    path, oracle = ckpt
    _plan_after_ranks_started(monkeypatch, str(tmp_path), ranks=2)
    worker = fault_workers.announces_start(str(tmp_path))
    with orchestrator.load(path, tp=2, nodes=2, worker_cls=worker, progress=False) as m:
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
        assert set(m.timings) == {"resolve", "connect", "start ranks", "plan", "attach plan", "fetch", "materialize"}
    assert sorted(os.listdir(tmp_path)) == ["started-0-without-plan", "started-1-without-plan"]
    assert wait_until_clean() == ([], [])


@pytest.mark.cluster
def test_planning_error_after_ranks_started_is_reported_as_itself(ray_cluster, ckpt, tmp_path, monkeypatch):
    path = str(tmp_path / "bad")
    shutil.copytree(ckpt[0], path)
    config = json.load(open(os.path.join(path, "config.json")))
    config["intermediate_size"] = 64  # the checkpoint's MLP is 48 wide: found when the skeleton is built
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    markers = tmp_path / "markers"
    markers.mkdir()
    _plan_after_ranks_started(monkeypatch, str(markers), ranks=2)
    with pytest.raises(ConversionError, match="checkpoint shape differs from what config.json builds"):
        orchestrator.load(path, tp=2, nodes=2, worker_cls=fault_workers.announces_start(str(markers)), progress=False)
    assert len(os.listdir(markers)) == 2
    assert wait_until_clean() == ([], [])


@pytest.mark.cluster
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
        report = w.finalize()
        assert report.skeleton_seconds > 0 and report.import_seconds >= 0  # timed on the skeleton's thread
    checkpoints.assert_state_equal(assemble_state_dict(plan, {w.rank: w.local_state() for w in workers}), oracle)



def test_a_preloaded_rank_given_its_plan_builds_its_skeleton_before_it_reads(ckpt):
    """In a process that already imported transformers' model code (a Ray worker preloaded with
    ``workers.preload``; this test process too), the skeleton is built as the rank starts, not after
    its reads; the weights are the same."""
    import transformers.modeling_utils  # noqa: F401 - what a preloaded worker has

    path, oracle = ckpt
    plan = orchestrator.plan(path, tp=1)
    worker = RankWorker(plan, 0)
    worker._skeleton_thread.join(timeout=60)
    assert "model" in worker._skeleton and "error" not in worker._skeleton
    assert worker.progress.done == 0  # built before any read
    worker.load({f.name: os.path.join(path, f.name) for f in plan.files})
    report = worker.finalize()
    assert report.import_seconds < 0.5
    checkpoints.assert_state_equal(worker.local_state(), oracle)


@pytest.mark.cluster
def test_a_preloaded_rank_0_plans_while_the_driver_still_imports_and_its_plan_is_used(ray_cluster, ckpt, tmp_path, monkeypatch):
    """Rank 0 says it is preloaded: the driver asks it to plan too; the driver's own planning is held
    back until rank 0 has planned, so rank 0's plan is the one used — loaded bit-exact, and cached."""
    path, oracle = ckpt
    markers = tmp_path / "markers"
    markers.mkdir()
    real = orchestrator.api.make_plan

    def after_rank_0(*args, **kwargs):
        deadline = time.monotonic() + 120
        while not (markers / "planned-0").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("rank 0 was never asked to plan")
            time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(orchestrator.api, "make_plan", after_rank_0)
    cache = tmp_path / "plans"
    worker = fault_workers.preloaded_planner(str(markers))
    with orchestrator.load(path, tp=2, nodes=2, worker_cls=worker, progress=False, plan_cache=str(cache)) as m:
        assert m.planned_on == "rank 0"
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
        assert m.plan == orchestrator.plan(path, tp=2, nodes=2)
    assert sorted(os.listdir(markers)) == ["planned-0"]
    with orchestrator.load(path, tp=2, nodes=2, progress=False, plan_cache=str(cache)) as again:
        assert again.plan_cached and again.plan == m.plan
    assert wait_until_clean() == ([], [])
