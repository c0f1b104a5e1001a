"""The Hugging Face cache as it is on disk loads like any folder, and opens no way out of the cache.

What ``huggingface_hub.snapshot_download`` returns — ``<cache>/models--org--name/snapshots/<commit>``,
every file a symlink into ``../../blobs/`` — plans and loads as a local folder, bit for bit against
transformers; a repo id already in the local cache plans and loads while the Hub cannot be reached. The
confinement rule (``planning.confinement``) follows a snapshot's links only into blobs of the same repo:
links into another repo, to a file not named by a hash, or out of the cache are refused.

The cache is filled by the real huggingface_hub client from ``tests.hub_server``; loads run every rank
in this process (``RankWorker``) except one test on the shared cluster.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest

import orchestrator
from workers.sources import hub_cache
from planning.checkpoint import build_local_index
from planning.errors import CheckpointError
from tests import checkpoints
from tests.conftest import wait_until_clean
from tests.hub_server import HubServer
from tests.checkpoints import load_fetched as load_in_process
from workers.sources.fetch_types import FetchOptions
from workers.sources.hub_fetcher import NodeFetcher

REPO, OTHER = "org/tiny", "org/other"
UNREACHABLE = "http://127.0.0.1:9"  # nothing listens there


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tiny = checkpoints.llama(str(tmp_path_factory.mktemp("tiny")), tied=False)
    other = checkpoints.llama(str(tmp_path_factory.mktemp("other")), tied=False, seed=3)
    return {REPO: (tiny, checkpoints.state_of(tiny)), OTHER: (other, None)}


@pytest.fixture(scope="module")
def hf_cache(folders, tmp_path_factory):
    """A huggingface_hub cache filled by ``snapshot_download``, as a user's would be; the snapshot folders."""
    from huggingface_hub import snapshot_download

    cache = str(tmp_path_factory.mktemp("hf-cache"))
    with HubServer() as server:
        for repo_id, (path, _) in folders.items():
            server.add_repo(repo_id, path)
        snapshots = {r: snapshot_download(r, cache_dir=cache, endpoint=server.url) for r in folders}
    return cache, snapshots


def _copy_cache(hf_cache, tmp_path) -> tuple[str, dict[str, str]]:
    """A private copy (symlinks kept) that a test may damage."""
    cache, snapshots = hf_cache
    copy = str(tmp_path / "cache")
    shutil.copytree(cache, copy, symlinks=True)
    return copy, {r: s.replace(cache, copy, 1) for r, s in snapshots.items()}


def _load_in_process(plan, paths: dict[str, str]) -> dict:
    """Every rank of ``plan`` read in this process from ``paths``; the reassembled state."""
    return load_in_process(plan, {node.node: paths for node in plan.nodes})


def test_a_snapshot_folder_of_symlinks_into_blobs_loads_like_any_folder(folders, hf_cache):
    _, snapshots = hf_cache
    snap = snapshots[REPO]
    assert os.path.islink(os.path.join(snap, "config.json"))
    assert all(os.path.islink(os.path.join(snap, f)) for f in os.listdir(snap))
    plan = orchestrator.plan(snap, tp=2, pp=2, nodes=2)
    assert plan.model.kind == "local" and plan.model.root == snap
    state = _load_in_process(plan, {f.name: os.path.join(snap, f.name) for f in plan.files})
    checkpoints.assert_state_equal(state, folders[REPO][1])
    # a single file of the snapshot, passed by its path, too
    single = orchestrator.plan(os.path.join(snap, plan.files[0].name), tp=1, nodes=1) if len(plan.files) == 1 else None
    assert single is None or single.model.root == snap


@pytest.mark.parametrize("how", ["other repo's blob", "not a blob name", "outside the cache", "via a linked folder"])
def test_snapshot_links_are_followed_into_the_same_repos_blobs_only(hf_cache, tmp_path, how):
    cache, snapshots = _copy_cache(hf_cache, tmp_path)
    snap = snapshots[REPO]
    victim = sorted(f for f in os.listdir(snap) if f.endswith(".safetensors"))[0]
    link = os.path.join(snap, victim)
    blob = os.path.realpath(link)
    os.unlink(link)
    if how == "other repo's blob":  # a real blob, of the same size even, but of another repo
        other = os.path.realpath(os.path.join(snapshots[OTHER], victim))
        os.symlink(os.path.relpath(other, snap), link)
    elif how == "not a blob name":  # inside blobs/, but not a file huggingface_hub wrote there
        planted = os.path.join(os.path.dirname(blob), "planted.safetensors")
        shutil.copy(blob, planted)
        os.symlink(os.path.relpath(planted, snap), link)
    elif how == "outside the cache":
        outside = tmp_path / ("a" * 64)
        shutil.copy(blob, outside)
        os.symlink(str(outside), link)
    else:  # a blob name reached through a folder link out of the cache
        elsewhere = tmp_path / "elsewhere"
        os.makedirs(elsewhere)
        shutil.copy(blob, elsewhere / os.path.basename(blob))
        os.symlink(str(elsewhere), os.path.join(snap, "sub"))
        os.symlink(os.path.join("sub", os.path.basename(blob)), link)
    with pytest.raises(CheckpointError, match=rf"file name '{victim}' escapes the checkpoint folder {snap} \(it resolves to .*only links to blobs of the same repo"):
        build_local_index(snap)
    with pytest.raises(CheckpointError, match="escapes the checkpoint folder"):
        orchestrator.plan(snap, tp=1, nodes=1)


def test_config_json_is_confined_too(hf_cache, tmp_path):
    cache, snapshots = _copy_cache(hf_cache, tmp_path)
    snap = snapshots[REPO]
    outside = tmp_path / "config.json"
    shutil.copy(os.path.join(snap, "config.json"), outside)
    os.unlink(os.path.join(snap, "config.json"))
    os.symlink(str(outside), os.path.join(snap, "config.json"))
    with pytest.raises(CheckpointError, match="file name 'config.json' escapes the checkpoint folder"):
        orchestrator.plan(snap, tp=1, nodes=1)


def test_a_repo_id_in_the_local_cache_plans_and_loads_without_the_hub(folders, hf_cache, tmp_path, monkeypatch, caplog):
    cache, _ = _copy_cache(hf_cache, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MESHLOAD_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    with caplog.at_level(logging.WARNING, logger="meshload"):
        plan = orchestrator.plan(REPO, tp=2, nodes=2, cache_dir=cache)
    assert f"the Hub at {UNREACHABLE} cannot be reached" in caplog.text and "planned from the local cache" in caplog.text
    assert plan.model.kind == "hub" and all(f.sha256 for f in plan.files)
    paths = {}
    for node in range(2):  # each node finds everything in its cache: no request
        outcome = NodeFetcher(plan, node, cache_dir=cache, options=FetchOptions(max_attempts=1)).fetch()
        assert all(f.from_cache and f.bytes_fetched == 0 for f in outcome.files)
        paths.update({f.file: f.path for f in outcome.files})
    checkpoints.assert_state_equal(_load_in_process(plan, paths), folders[REPO][1])
    # a repo that is not in the cache: the error is the Hub's, not the cache's
    with pytest.raises(CheckpointError, match=r"org/absent@main: resolving the revision: .*the Hub could not be reached"):
        orchestrator.plan("org/absent", tp=1, nodes=1, cache_dir=cache)


def test_a_planted_snapshot_link_in_a_node_cache_is_removed_not_followed(hf_cache, tmp_path, monkeypatch):
    cache, snapshots = _copy_cache(hf_cache, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    plan = orchestrator.plan(REPO, tp=1, nodes=1, cache_dir=cache)
    victim = plan.files[0].name
    link = os.path.join(snapshots[REPO], victim)
    precious = tmp_path / "precious"
    precious.write_text("not a checkpoint file; must survive")
    os.unlink(link)
    os.symlink(str(precious), link)
    fetcher = NodeFetcher(plan, 0, cache_dir=cache, offline=True, options=FetchOptions(max_attempts=1, mode="files"))
    with pytest.raises(CheckpointError, match=rf"{victim}: offline mode"):
        fetcher.fetch()
    assert precious.read_text() == "not a checkpoint file; must survive"
    assert not os.path.lexists(link)
    assert hub_cache.complete_file(cache, REPO, commit=plan.model.revision, filename=victim) is None


@pytest.mark.cluster
def test_a_snapshot_folder_loads_on_the_cluster(ray_cluster, folders, hf_cache):
    _, snapshots = hf_cache
    with orchestrator.load(snapshots[REPO], tp=2, nodes=2, progress=False) as m:
        checkpoints.assert_state_equal(m.full_state_dict(), folders[REPO][1])
    assert wait_until_clean() == ([], [])
