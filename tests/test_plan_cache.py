"""The plan cache: a driver loading a checkpoint it (or another driver) loaded before, the same way,
reuses the stored plan instead of planning, and so imports neither transformers nor torch before the
model is ready; anything that changes the plan (config, headers, options, the planning code) is a
different key."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

import orchestrator
import orchestrator.api
from planning.errors import ConversionError
from planning.plan_json import plan_to_json
from orchestrator.plan_cache import PlanCache, plan_key
from workers.sources import resolve_model
from tests import checkpoints
from tests.conftest import wait_until_clean

OPTIONS = dict(tp=2, pp=1, nodes=2, device="cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)
    return path, checkpoints.reference(path).state_dict()


def _key(path: str, **options) -> str:
    return plan_key(resolve_model(path), {**OPTIONS, **options})


def test_the_key_follows_what_decides_the_plan(tmp_path):
    path = checkpoints.llama(str(tmp_path / "a"), tied=False)
    key = _key(path)
    assert _key(path) == key
    # saved again with other values: same headers, same byte ranges, same plan
    checkpoints.llama(path, tied=False, seed=7)
    assert _key(path) == key
    assert _key(path, tp=1, nodes=1) != key
    assert _key(path, dtype="float32") != key
    assert _key(path, tp_plan={"model.layers.*.mlp.down_proj": "rowwise"}) != key
    config = json.load(open(os.path.join(path, "config.json")))
    config["rms_norm_eps"] = 1e-3
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    assert _key(path) != key
    moved = shutil.copytree(path, str(tmp_path / "b"))  # the plan names its folder
    assert _key(moved) != _key(path)
    reshaped = checkpoints.llama(str(tmp_path / "c"), tied=False, intermediate_size=64)
    shutil.rmtree(path)
    shutil.copytree(reshaped, path)
    assert _key(path) not in (key, _key(reshaped))


def test_an_unreadable_entry_is_reported_and_replaced(ckpt, tmp_path, caplog):
    cache = PlanCache(tmp_path)
    plan = orchestrator.plan(ckpt[0], tp=2, nodes=2)
    assert cache.put("k", plan) == tmp_path / "k.json"
    assert plan_to_json(cache.get("k")) == plan_to_json(plan)
    (tmp_path / "k.json").write_text('{"version": 1, "ranks": [')
    with caplog.at_level(logging.WARNING, logger="meshload"):
        assert cache.get("k") is None
    assert f"plan cache entry {tmp_path / 'k.json'} is not a valid plan" in caplog.text
    assert not (tmp_path / "k.json").exists()
    assert cache.get("absent") is None


def test_the_folder_keeps_the_most_recently_used_entries(ckpt, tmp_path):
    cache = PlanCache(tmp_path, max_entries=2)
    plan = orchestrator.plan(ckpt[0], tp=2, nodes=2)
    for n, key in enumerate(["a", "b"]):
        cache.put(key, plan)
        os.utime(tmp_path / f"{key}.json", ns=(n * 10**9, n * 10**9))  # "a" older than "b"
    assert cache.get("a") is not None  # a hit makes "a" the most recent
    cache.put("c", plan)
    assert sorted(os.listdir(tmp_path)) == ["a.json", "c.json"]


def test_a_killed_drivers_half_written_entry_is_removed(ckpt, tmp_path):
    stale, fresh = tmp_path / ".0123456789abcdef.x1.tmp", tmp_path / ".fedcba9876543210.x2.tmp"
    for f in (stale, fresh):
        f.write_text('{"version": 1, "ran')
    os.utime(stale, (0, 0))  # a driver killed while writing it, long ago
    PlanCache(tmp_path).put("k", orchestrator.plan(ckpt[0], tp=2, nodes=2))
    assert sorted(os.listdir(tmp_path)) == [fresh.name, "k.json"]  # a fresh one may be another driver's, being written


def test_a_folder_that_cannot_be_written_is_not_fatal(ckpt, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = PlanCache(blocker / "plans")
    with caplog.at_level(logging.WARNING, logger="meshload"):
        assert cache.put("k", orchestrator.plan(ckpt[0], tp=2, nodes=2)) is None
    assert f"the plan cannot be cached in {blocker / 'plans'}" in caplog.text


@pytest.mark.cluster
def test_a_new_driver_reuses_the_plan_and_imports_neither_torch_nor_transformers(ray_cluster, ckpt, tmp_path, monkeypatch):
    path, oracle = ckpt
    cache = tmp_path / "plans"
    with orchestrator.load(path, tp=2, nodes=2, progress=False, plan_cache=str(cache)) as m:
        assert not m.plan_cached
        first = plan_to_json(m.plan)
    assert len(os.listdir(cache)) == 1

    def no_planning(*args, **kwargs):
        raise AssertionError("planned although the plan was cached")

    monkeypatch.setattr(orchestrator.api, "make_plan", no_planning)
    with orchestrator.load(path, tp=2, nodes=2, progress=False, plan_cache=str(cache)) as m:
        assert m.plan_cached and plan_to_json(m.plan) == first
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
    # A new driver process: the plan comes from the cache, so until the model is ready neither torch nor
    # transformers is imported on the driver (the ranks import them); torch comes with the first tensors.
    script = f"""
import json, sys
import orchestrator
from planning.plan_json import plan_to_json
heavy = lambda: sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "transformers", "numpy"))
with orchestrator.load({path!r}, tp=2, nodes=2, progress=False, plan_cache={str(cache)!r}) as m:
    at_ready = heavy()
    tokens = m.generate({checkpoints.PROMPT.tolist()!r}, max_new_tokens=3).tolist()
    print("RESULT " + json.dumps([m.plan_cached, plan_to_json(m.plan) == {first!r}, at_ready, tokens,
                                  "transformers" in sys.modules]))
"""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cached, same_plan, at_ready, tokens, transformers_imported = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert (cached, same_plan, at_ready, transformers_imported) == (True, True, [], False)
    _, want = checkpoints.expected_outputs(checkpoints.reference(path), max_new_tokens=3)
    assert tokens == want.tolist()
    assert wait_until_clean() == ([], [])


def test_a_gpu_load_imports_torch_on_the_driver_while_the_ranks_load_a_cpu_load_does_not():
    """On a GPU load the driver imports torch on a thread while it waits for the ranks (the first logits need
    it); on a CPU load it does not (the ranks' reads need the cores). In a fresh interpreter, as a driver."""
    script = """
import json, sys
import orchestrator.api as api
cpu = api._import_torch_meanwhile("cpu")
before = "torch" in sys.modules
thread = api._import_torch_meanwhile("cuda")
thread.join()
print("RESULT " + json.dumps([cpu is None, before, thread.name, "torch" in sys.modules,
                              api._import_torch_meanwhile("cuda") is None]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.split("RESULT ", 1)[1]) == [True, False, "meshload-driver-torch", True, True]


@pytest.mark.cluster
def test_a_changed_checkpoint_is_planned_again_not_loaded_from_a_stale_plan(ray_cluster, ckpt, tmp_path):
    path = shutil.copytree(ckpt[0], str(tmp_path / "ckpt"))
    cache = tmp_path / "plans"
    with orchestrator.load(path, tp=2, nodes=2, progress=False, plan_cache=False):
        pass
    assert not cache.exists() and not os.listdir(os.environ["MESHLOAD_PLAN_CACHE"])  # off: nothing stored
    with orchestrator.load(path, tp=2, nodes=2, progress=False, plan_cache=str(cache)) as m:
        assert not m.plan_cached
    config = json.load(open(os.path.join(path, "config.json")))
    config["intermediate_size"] = 64  # the checkpoint's MLP is 48 wide: only planning can tell
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConversionError, match="checkpoint shape differs from what config.json builds"):
        orchestrator.load(path, tp=2, nodes=2, progress=False, plan_cache=str(cache))
    assert len(os.listdir(cache)) == 1  # the failed plan stored nothing
    assert wait_until_clean() == ([], [])
