"""Plans from elsewhere — a JSON file, the plan cache, a Hub endpoint's answers — cannot reach outside
their checkpoint: each tampered plan or hostile answer is refused with a clear error before anything
runs, and nothing outside the checkpoint folder or the cache is read, written or deleted.

No cluster: every check happens before ``load`` connects to Ray (each ``load`` below is given an address
where nothing listens, so getting past the check would be a ``ClusterError`` instead). Hub answers come
from ``tests.hub_server`` through the real huggingface_hub client.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

import orchestrator
import orchestrator.api
from workers.sources import hub_cache
from planning.errors import CheckpointError, PlanError
from planning.options import PlanOptions, SourceOptions
from planning.plan import LoadPlan
from planning.plan_json import plan_from_json, plan_to_json
from orchestrator.plan_cache import PlanCache, plan_key
from workers.sources import resolve_model
from tests import checkpoints
from tests.hub_server import HubServer
from workers.sources.fetch_types import FetchOptions
from workers.sources.hub_fetcher import NodeFetcher

NOWHERE = "127.0.0.1:9"  # nothing listens: reaching connect() would be a ClusterError, not the plan's error
REPO = "org/tiny"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)


@pytest.fixture(scope="module")
def hub(local):
    server = HubServer().start()
    try:
        server.add_repo(REPO, local)
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("MESHLOAD_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    hub.lie(REPO)
    yield tmp_path / "cache"
    hub.lie(REPO)


def _tampered(plan: LoadPlan, edit) -> str:
    data = json.loads(plan_to_json(plan))
    edit(data)
    return json.dumps(data)


# -- plans read back from JSON --------------------------------------------------------------------------

def test_a_hub_plan_whose_revision_is_a_path_is_refused_and_no_file_is_deleted(hub_env, tmp_path):
    """Before: the revision went into the snapshot path, and a node's fetcher removed a "cached file of the
    wrong size" found there — a file outside its cache."""
    plan = orchestrator.plan(REPO, tp=1, nodes=1)
    fname = plan.files[0].name
    cache = str(hub_env)
    victim_dir = os.path.normpath(os.path.join(hub_cache.repo_folder(cache, REPO), "snapshots", "../../../x"))
    os.makedirs(victim_dir, exist_ok=True)
    victim = os.path.join(victim_dir, fname)
    with open(victim, "w") as f:
        f.write("a file of the user's, outside the cache")
    text = _tampered(plan, lambda d: d["model"].__setitem__("revision", "../../../x"))
    with pytest.raises(PlanError, match=r"revision '\.\./\.\./\.\./x' is not a commit sha \(40 hex digits\)"):
        plan_from_json(text)
    bad = dataclasses.replace(plan, model=dataclasses.replace(plan.model, revision="../../../x"))
    with pytest.raises(PlanError, match="is not a commit sha"):
        NodeFetcher(bad, 0, cache_dir=cache, options=FetchOptions(mode="files")).fetch()
    with pytest.raises(PlanError, match="is not a commit sha"):
        orchestrator.load(bad, address=NOWHERE)
    assert os.path.exists(victim)


def test_a_local_plan_reading_etc_passwd_is_refused(local):
    plan = orchestrator.plan(local, tp=1, nodes=1)
    fname = plan.files[0].name
    # root "/" and file "etc/passwd": well formed, so it reads back; the checkpoint it names does not exist
    text = plan_to_json(plan).replace(json.dumps(local), json.dumps("/")).replace(json.dumps(fname), json.dumps("etc/passwd"))
    evil = plan_from_json(text)
    assert evil.model.root == "/" and evil.files[0].name == "etc/passwd"
    with pytest.raises(CheckpointError, match=r"the plan names the checkpoint folder /, which cannot be resolved: /: no model"):
        orchestrator.load(evil, address=NOWHERE)
    # the right folder, but a name reaching out of it: refused when read back
    for name in ("../../../etc/passwd", "/etc/passwd"):
        with pytest.raises(PlanError, match="escapes the checkpoint folder|is absolute"):
            plan_from_json(plan_to_json(plan).replace(json.dumps(fname), json.dumps(name)))
    # another file of the folder is not a file of the checkpoint
    other = plan_from_json(plan_to_json(plan).replace(json.dumps(fname), json.dumps("config.json")))
    with pytest.raises(PlanError, match=r"names file 'config.json', which is not a file of the checkpoint"):
        orchestrator.load(other, address=NOWHERE)


def test_a_plan_reading_other_bytes_than_the_header_gives_is_refused(local):
    plan = orchestrator.plan(local, tp=1, nodes=1)
    data = json.loads(plan_to_json(plan))
    item = data["ranks"][0]["params"][0]["reads"][0]
    assert item["src_dtype"] == "float32"
    item["src_dtype"] = "int32"  # same bytes, read as another type: validate_plan cannot tell
    with pytest.raises(PlanError, match=rf"reads tensor '{item['tensor']}' from .* at byte {item['file_offset']}, int32 .* but in the checkpoint it is .* float32"):
        orchestrator.load(plan_from_json(json.dumps(data)), address=NOWHERE)


def test_a_plan_of_a_changed_checkpoint_is_refused(tmp_path):
    folder = checkpoints.llama(str(tmp_path / "c"), tied=False, shard=None)
    plan = orchestrator.plan(folder, tp=1, nodes=1)
    checkpoints.llama(folder, tied=False, shard=None, intermediate_size=64)  # another checkpoint at the same path
    with pytest.raises(PlanError, match=r"model.safetensors differs from the checkpoint.s in size, header_size, header_sha256"):
        orchestrator.load(plan, address=NOWHERE)


def test_malformed_plan_json_is_a_plan_error(local):
    plan = orchestrator.plan(local, tp=1, nodes=1)
    for edit, message in (
        (lambda d: d["ranks"][0]["params"][0]["reads"][0].__setitem__("file_offset", "8"), "expected int, got str"),
        (lambda d: d.__setitem__("files", {"a": 1}), "expected a JSON list"),
        (lambda d: d["model"].__setitem__("kind", "../s3"), "checkpoint kind '../s3' is not a source's name"),
        (lambda d: d["model"].__setitem__("revision", "main") or d["model"].__setitem__("root", None), "revision 'main' is not"),
        (lambda d: d["files"][0].__setitem__("sha256", "../x"), "sha256 '../x' is not 64 hex digits"),
    ):
        with pytest.raises(PlanError, match=message):
            plan_from_json(_tampered(plan, edit))
    with pytest.raises(PlanError, match="a plan must be JSON"):
        plan_from_json("{")


# -- the plan cache -------------------------------------------------------------------------------------

OPTIONS = dict(tp=1, pp=1, nodes=1, device="cpu")


def _start(path: str, cache: str):
    return orchestrator.api._Planning.start(path, PlanOptions(**OPTIONS), SourceOptions(), plan_cache=cache)


def test_a_tampered_cache_entry_is_refused_and_planned_again(local, tmp_path, caplog):
    cache = PlanCache(tmp_path / "plans")
    first = _start(local, str(tmp_path / "plans")).result()
    key = plan_key(resolve_model(local), dict(OPTIONS))
    assert cache.path(key).exists()
    fname = first.files[0].name
    other = sorted(f for f in os.listdir(local) if f.endswith(".safetensors") and f != fname)[0]
    # another user rewrote the entry: same key, a plan reading another file at the same offsets
    swapped = plan_to_json(first).replace(json.dumps(fname), '"@@"').replace(json.dumps(other), json.dumps(fname))
    cache.path(key).write_text(swapped.replace('"@@"', json.dumps(other)))
    assert plan_from_json(cache.path(key).read_text())  # self-consistent: validate_plan cannot tell
    with caplog.at_level(logging.WARNING, logger="meshload"):
        again = _start(local, str(tmp_path / "plans"))
    assert not again.cached
    assert f"plan cache entry {cache.path(key)} is not a valid plan" in caplog.text and "differs from the checkpoint's" in caplog.text
    assert plan_to_json(again.result()) == plan_to_json(first)
    assert plan_to_json(cache.get(key)) == plan_to_json(first)  # replaced by the plan made again
    assert _start(local, str(tmp_path / "plans")).cached


def test_a_cache_entry_for_other_options_or_a_symlink_is_not_used(local, tmp_path, caplog):
    folder = tmp_path / "plans"
    plan = _start(local, str(folder)).result()
    key = plan_key(resolve_model(local), dict(OPTIONS))
    two = orchestrator.plan(local, tp=2, nodes=1)
    PlanCache(folder).put(key, two)  # a tp=2 plan under the tp=1 key
    with caplog.at_level(logging.WARNING, logger="meshload"):
        again = _start(local, str(folder))
    assert not again.cached and again.result().tp == 1
    assert "is for tp=2, not the tp=1 asked for" in caplog.text
    target = tmp_path / "elsewhere.json"
    target.write_text(plan_to_json(plan))
    os.unlink(PlanCache(folder).path(key))
    os.symlink(target, PlanCache(folder).path(key))
    assert PlanCache(folder).get(key) is None  # never followed
    assert os.stat(folder).st_mode & 0o777 == 0o700
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in folder.glob("*.json") if not p.is_symlink())


# -- hostile Hub answers ----------------------------------------------------------------------------------

def test_a_hub_answering_a_path_for_a_commit_is_refused(hub, hub_env, tmp_path):
    hub.lie(REPO, commit="../../../x")
    with pytest.raises(CheckpointError, match=rf"{REPO}@main: the Hub at {hub.url} answered a commit that: revision '\.\./\.\./\.\./x' is not a commit sha"):
        orchestrator.plan(REPO, tp=1, nodes=1)
    assert not os.path.exists(os.path.join(str(hub_env), "..", "x"))
    # nothing but the repo's own cache folder was created
    assert os.listdir(hub_env) in ([], [os.path.basename(hub_cache.repo_folder(str(hub_env), REPO))])


def test_a_hub_listing_a_bad_sha256_is_refused(hub, hub_env):
    name = next(n for n in hub.repos[REPO].files if n.endswith(".safetensors"))
    hub.lie(REPO, sha256={name: "../../../../evil"})
    with pytest.raises(CheckpointError, match=rf"{name}: the Hub's listing at {hub.url}: sha256 '\.\./\.\./\.\./\.\./evil' is not 64 hex digits"):
        orchestrator.plan(REPO, tp=1, nodes=1)


def test_a_hub_serving_another_checksum_than_planned_is_refused_before_downloading(hub, hub_env):
    plan = orchestrator.plan(REPO, tp=1, nodes=1)
    name = plan.files[0].name
    hub.lie(REPO, sha256={name: "0" * 64})  # the HEAD of the file now names another blob
    hub.reset_log()
    fetcher = NodeFetcher(plan, 0, cache_dir=str(hub_env / "node"), options=FetchOptions(mode="files", max_attempts=1))
    with pytest.raises(CheckpointError, match=rf"{name}: the Hub at .* serves commit .* with checksum '0{{64}}', but the plan has"):
        fetcher.fetch()
    blob = hub.repos[REPO].files[name].sha256
    assert not hub.served(lambda s: s.origin == "cdn" and s.method == "GET" and s.path.endswith(blob))  # not downloaded
    assert not os.path.exists(os.path.join(hub_cache.repo_folder(str(hub_env / "node"), REPO), "blobs", "0" * 64))
