"""What a node reads is what the plan was made from, and a node's cache cannot be turned against it.

- Ranges: each fetched piece's sha256 is recorded in the manifest and re-checked when a later fetch
  reuses it; a piece changed on disk is fetched again. The fetched header must be the plan's (digest).
- Whole files: always hashed (sha256, or the git blob id of a file kept in git, not LFS); a blob is
  trusted again only while it is the very file meshload hashed (inode, size, mtime, ctime), never for
  its name; a changed one is re-hashed, removed and fetched again.
- Writes: meshload's files are private (0600 in 0700 folders), opened with ``O_NOFOLLOW`` (a planted
  symlink is refused, its target untouched), replaced by atomic renames; a folder of meshload's that
  others can write is refused.
- Node-local files: a rank checks size and header digest on the descriptor it then reads through; a
  copy that was truncated or is another checkpoint at the same path fails, naming the node.

Real huggingface_hub client against ``tests.hub_server``; fetchers and ranks in this process, except one
test on the shared cluster.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat

import pytest

import orchestrator
import workers.sources.hub_whole
from workers.sources import hub_cache, part_store
from planning.errors import CheckpointError
from tests import checkpoints
from tests.conftest import wait_until_clean
from tests.hub_server import Fault, HubServer
from tests.security_workers import RewritesAHeaderBeforeReading, flip_first_dtype
from workers.sources.fetch_types import FetchOptions
from workers.sources.hub_fetcher import NodeFetcher
from workers.rank_worker import RankWorker

REPO, GIT_REPO = "org/medium", "org/in-git"
FAST = dict(backoff_s=0.01, max_backoff_s=0.05, max_attempts=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checkpoints.llama(
        str(tmp_path_factory.mktemp("medium")), hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16, shard="40KB"
    )


@pytest.fixture(scope="module")
def hub(folder):
    with HubServer() as server:
        server.add_repo(REPO, folder)
        server.add_repo(GIT_REPO, folder, lfs=False)
        yield server


@pytest.fixture
def cache(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("MESHLOAD_CACHE_DIR", str(tmp_path / "driver"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MESHLOAD_FETCH", "MESHLOAD_FETCH_MAX_GAP"):
        monkeypatch.delenv(var, raising=False)
    hub.clear_faults()
    hub.reset_log()
    yield str(tmp_path / "node")
    hub.clear_faults()


def _fetch(plan, cache: str, node: int = 0, **options):
    outcome = NodeFetcher(plan, node, cache_dir=cache, options=FetchOptions(**{**FAST, **options})).fetch()
    return outcome, {f.file: f.path for f in outcome.files}


def _ranged(outcome):
    return next(f for f in outcome.files if not f.whole)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- ranges -----------------------------------------------------------------------------------------------

def test_each_fetched_range_is_recorded_with_its_checksum_and_rechecked_on_reuse(hub, cache, folder, caplog):
    plan = orchestrator.plan(REPO, tp=2, nodes=2)
    outcome, _ = _fetch(plan, cache, max_gap_bytes=0)
    part = _ranged(outcome)
    manifest_path = part.path[: -len(".part")] + ".json"
    f = hub.repos[REPO].files[part.file]
    manifest = part_store.read_manifest(manifest_path, file=part.file, size=f.size, sha256=f.sha256)
    with open(f.path, "rb") as src:
        original = src.read()
    assert manifest.pieces and all(hashlib.sha256(original[a:b]).hexdigest() == d for a, b, d in manifest.pieces)
    # the part changes on disk (a disk error, someone who could write it): the next fetch notices
    a, b, _ = max(manifest.pieces, key=lambda p: p[1] - p[0])
    with open(part.path, "r+b") as p:
        p.seek(a + (b - a) // 2)
        p.write(b"\xff\xfe\xfd\xfc")
    hub.reset_log()
    with caplog.at_level(logging.WARNING, logger="meshload"):
        again, _ = _fetch(plan, cache, max_gap_bytes=0)
    assert f"1 cached range(s) of {part.file} no longer match their checksum; fetching them again" in caplog.text
    served = [s for s in hub.served(lambda s: s.origin == "cdn" and s.status == 206)]
    assert [s.range for s in served] == [f"bytes={a}-{b - 1}"]
    assert not _ranged(again).from_cache
    with open(part.path, "rb") as p:
        data = p.read()
    assert data[a:b] == original[a:b]
    # untouched pieces are reused as they are: nothing fetched
    hub.reset_log()
    third, _ = _fetch(plan, cache, max_gap_bytes=0)
    assert all(f.from_cache for f in third.files) and not hub.served(lambda s: s.origin == "cdn")


def test_a_fetched_header_must_be_the_plans(hub, cache, tmp_path):
    """A server that serves another file of the same size and header length: the digest tells them apart."""
    plan = orchestrator.plan(REPO, tp=2, nodes=2)
    item = NodeFetcher(plan, 0, cache_dir=cache, options=FetchOptions(whole_above=2.0)).fetch_items[0]
    target = next(f for f in plan.files if f.name == item.file)
    other = tmp_path / "other.safetensors"
    shutil.copy(hub.repos[REPO].files[item.file].path, other)
    flip_first_dtype(str(other))
    hub.lie(REPO, content={item.file: str(other)})
    try:
        with pytest.raises(CheckpointError, match=rf"{item.file}: fetched header \({target.header_size} bytes, sha256 .*\) is not the plan's \({target.header_size} bytes, sha256 {target.header_sha256[:16]}"):
            _fetch(plan, cache, whole_above=2.0)
    finally:
        hub.lie(REPO)
    data, manifest = hub_cache.range_paths(cache, REPO, commit=plan.model.revision, filename=item.file)
    assert not os.path.exists(data) and not os.path.exists(manifest)


# -- whole files ------------------------------------------------------------------------------------------

def test_a_cached_blob_is_rehashed_when_it_changed_not_trusted_for_its_name(hub, cache, monkeypatch, caplog):
    plan = orchestrator.plan(REPO, tp=1, nodes=1)
    _, paths = _fetch(plan, cache, mode="files")
    hashed = []
    real = workers.sources.hub_whole.checksum_of
    monkeypatch.setattr(workers.sources.hub_whole, "checksum_of", lambda p, **k: hashed.append(p) or real(p, **k))
    outcome, _ = _fetch(plan, cache, mode="files")
    assert all(f.from_cache for f in outcome.files) and hashed == []  # the very files hashed before: not again
    name = plan.files[0].name
    blob = os.path.realpath(paths[name])
    assert os.path.basename(blob) == hub.repos[REPO].files[name].sha256 and _mode(blob) == 0o600
    with open(blob, "r+b") as f:  # same size, same name, other bytes
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    hub.reset_log()
    with caplog.at_level(logging.WARNING, logger="meshload"):
        outcome, _ = _fetch(plan, cache, mode="files")
    assert f"sha256" in caplog.text and "is unusable" in caplog.text
    assert hashed == [paths[name]] + [paths[name]]  # re-hashed, then the new download hashed
    with open(blob, "rb") as got, open(hub.repos[REPO].files[name].path, "rb") as want:
        assert got.read() == want.read()
    assert not next(f for f in outcome.files if f.file == name).from_cache


def test_files_kept_in_git_are_hashed_too(hub, cache):
    plan = orchestrator.plan(GIT_REPO, tp=1, nodes=1)
    assert all(f.sha256 is None and f.git_sha1 for f in plan.files)
    name = plan.files[0].name
    hub.inject(Fault(match=f"/{GIT_REPO}/resolve/", kind="corrupt", times=1, origin="hub"))
    outcome, paths = _fetch(plan, cache, mode="files")
    for f in plan.files:
        with open(paths[f.name], "rb") as got, open(hub.repos[GIT_REPO].files[f.name].path, "rb") as want:
            assert got.read() == want.read(), f.name
    corrupted = [s for s in hub.served(lambda s: s.fault == "corrupt")]
    assert corrupted, "the fault never fired"
    assert name or outcome


# -- writes -----------------------------------------------------------------------------------------------

def test_meshloads_files_are_private_and_planted_symlinks_are_refused(hub, cache, tmp_path):
    plan = orchestrator.plan(REPO, tp=2, nodes=2)
    outcome, _ = _fetch(plan, cache)
    part = _ranged(outcome)
    folder = hub_cache.repo_folder(cache, REPO)
    for sub in (hub_cache.RANGES_DIR, hub_cache.LOCKS_DIR, hub_cache.STAMPS_DIR):
        assert os.path.isdir(os.path.join(folder, sub)), sub
        for base, _, files in os.walk(os.path.join(folder, sub)):
            assert _mode(base) == 0o700, base
            assert all(_mode(os.path.join(base, n)) == 0o600 for n in files), (base, files)
    # a symlink planted where the part will be written again: refused, its target untouched
    data, manifest = hub_cache.range_paths(cache, REPO, commit=plan.model.revision, filename=part.file)
    os.unlink(data)
    os.unlink(manifest)
    precious = tmp_path / "precious"
    precious.write_bytes(b"somebody's file")
    os.symlink(precious, data)
    with pytest.raises(CheckpointError, match=rf"refusing to write {data}: it is a symlink"):
        _fetch(plan, cache)
    assert precious.read_bytes() == b"somebody's file"
    # a manifest written over a planted link replaces the link, never its target
    os.unlink(data)
    os.symlink(precious, manifest)
    f = next(f for f in plan.files if f.name == part.file)
    part_store.write_manifest(manifest, part_store.RangeManifest(f.name, f.size, f.sha256, ()))
    assert not os.path.islink(manifest) and precious.read_bytes() == b"somebody's file"
    assert _mode(manifest) == 0o600


def test_a_folder_of_meshloads_that_others_can_write_is_refused(hub, cache):
    plan = orchestrator.plan(REPO, tp=2, nodes=2)
    _fetch(plan, cache)
    ranges = os.path.join(hub_cache.repo_folder(cache, REPO), hub_cache.RANGES_DIR)
    shutil.rmtree(os.path.join(ranges, plan.model.revision))
    os.chmod(ranges, 0o777)  # as if another user had made it, world-writable, in a shared cache
    try:
        with pytest.raises(CheckpointError, match=rf"refusing to write into {ranges}: .* mode 777"):
            _fetch(plan, cache)
    finally:
        os.chmod(ranges, 0o700)


# -- node-local files -------------------------------------------------------------------------------------

def _read_all(plan, paths):
    for r in plan.ranks:
        RankWorker(plan, r.rank).load(paths)


def test_a_rank_refuses_another_checkpoint_or_a_truncated_copy_at_the_planned_path(folder, tmp_path):
    path = shutil.copytree(folder, tmp_path / "c")
    plan = orchestrator.plan(str(path), tp=2, nodes=2)
    paths = {f.name: os.path.join(path, f.name) for f in plan.files}
    _read_all(plan, paths)
    victim = plan.ranks[1].files[0]
    flip_first_dtype(paths[victim])  # same size, another header: another checkpoint
    with pytest.raises(CheckpointError, match=rf"{victim}: the header of {paths[victim]} on node .* is not the one the plan was made from"):
        _read_all(plan, paths)
    shutil.copy(os.path.join(folder, victim), paths[victim])
    with open(paths[victim], "r+b") as f:
        f.truncate(os.path.getsize(paths[victim]) - 10)
    with pytest.raises(CheckpointError, match=rf"{victim}: {paths[victim]} on node .* is \d+ bytes but the plan was made from a copy of \d+ bytes"):
        _read_all(plan, paths)
    # a path handed to a rank must be the plan's file, resolved inside the plan's folder
    with pytest.raises(CheckpointError, match="which is not"):
        RankWorker(plan, 0).load({**paths, victim: os.path.join(folder, victim)})


@pytest.mark.cluster
def test_another_checkpoint_on_a_ranks_node_fails_the_load_naming_the_node(ray_cluster, folder, tmp_path):
    path = str(shutil.copytree(folder, tmp_path / "c"))
    with pytest.raises(CheckpointError) as err:
        orchestrator.load(path, tp=2, nodes=2, progress=False, worker_cls=RewritesAHeaderBeforeReading)
    text = str(err.value)
    assert "[Rank " in text and "(node 127.0.0." in text and "is not the one the plan was made from" in text, text
    assert wait_until_clean() == ([], [])
