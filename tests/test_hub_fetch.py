"""Hub checkpoints: plan from headers only, fetch per node only what its ranks read, survive faults.

Everything goes through the real huggingface_hub client against ``tests.hub_server`` on loopback
(``HF_ENDPOINT``), serving repos written by transformers' ``save_pretrained``; what was downloaded
is asserted from the server's own log of body bytes sent. Cluster tests run on a private 2-node
cluster whose nodes have their own cache folders (``MESHLOAD_CACHE_DIR`` per node), as machines
without a shared disk would.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

import orchestrator
from planning.checkpoint import build_local_index
from planning.errors import CheckpointError
from planning.plan_json import plan_to_json
from workers.sources.hub_cache import range_paths, repo_folder
from workers.sources.part_store import read_manifest
from tests import checkpoints, fault_workers
from tests.conftest import _start_cluster, remove_a_rank_node_while_loading, wait_until_clean
from tests.hub_server import Fault, HubServer
from planning.fetch_list import node_fetch_items
from workers.sources.fetch_types import FetchOptions
from workers.sources.hub_fetcher import NodeFetcher

SHARDED, SINGLE, PICKLE, MEDIUM = "org/tiny-llama", "org/tiny-single", "org/tiny-pickle", "org/medium-llama"
MEDIUM_NEXT = "org/medium-llama-step1"  # MEDIUM's next training step: the same shapes, other values, other shards
FAST = dict(backoff_s=0.01, max_backoff_s=0.05, max_attempts=3)


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Local folders (written by save_pretrained) and transformers' own state of each."""
    out = {}
    sharded = checkpoints.llama(str(tmp_path_factory.mktemp("sharded")), tied=False)
    single = checkpoints.llama(str(tmp_path_factory.mktemp("single")), shard=None)
    medium_shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16)
    medium = checkpoints.llama(str(tmp_path_factory.mktemp("medium")), shard="40KB", **medium_shape)
    medium_next = checkpoints.llama(str(tmp_path_factory.mktemp("medium-next")), shard="60KB", seed=1, **medium_shape)
    pickle_dir = str(tmp_path_factory.mktemp("pickle"))
    checkpoints.llama(pickle_dir, shard=None)
    state = {k: v for k, v in checkpoints.state_of(pickle_dir).items()}
    os.unlink(os.path.join(pickle_dir, "model.safetensors"))
    torch.save(state, os.path.join(pickle_dir, "pytorch_model.bin"))
    for repo_id, path in ((SHARDED, sharded), (SINGLE, single), (MEDIUM, medium), (MEDIUM_NEXT, medium_next), (PICKLE, pickle_dir)):
        out[repo_id] = (path, checkpoints.state_of(path) if repo_id != PICKLE else None)
    return out


@pytest.fixture(scope="module")
def hub(repos):
    server = HubServer().start()
    try:
        for repo_id, (path, _) in repos.items():
            server.add_repo(repo_id, path)
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def hub_env(hub, monkeypatch, tmp_path):
    """Point the client at the test server; a fresh driver cache; no offline flag; no faults."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("MESHLOAD_CACHE_DIR", str(tmp_path / "driver-cache"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MESHLOAD_FETCH", "MESHLOAD_FETCH_MAX_GAP", "MESHLOAD_FETCH_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    hub.clear_faults()
    hub.reset_log()
    yield
    hub.clear_faults()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _lfs_bytes(hub: HubServer, repo_id: str, name: str | None = None) -> int:
    """File bytes the CDN origin sent (200/206 bodies) for the repo's LFS files (one file if ``name``)."""
    shas = {f.sha256 for n, f in hub.repos[repo_id].files.items() if f.lfs and name in (None, n)}
    return hub.bytes_served(lambda s: s.origin == "cdn" and s.status in (200, 206) and s.path.rsplit("/", 1)[-1] in shas)


def assert_cache_sound(cache: str, hub: HubServer, repo_id: str) -> None:
    """Nothing corrupt or partial where a reader would look, and every range a manifest vouches for is right."""
    repo = hub.repos[repo_id]
    folder = repo_folder(cache, repo_id)
    for base, _, names in os.walk(cache):
        for n in names:
            assert not n.endswith(".incomplete"), f"partial download left behind: {os.path.join(base, n)}"
    snap = os.path.join(folder, "snapshots", repo.commit)
    for base, _, names in os.walk(snap):
        for n in names:
            path = os.path.join(base, n)
            name = os.path.relpath(path, snap).replace(os.sep, "/")
            assert os.path.exists(path), f"dangling snapshot entry {path}"
            assert _sha256(path) == repo.files[name].sha256, f"corrupt file in the cache: {path}"
    for name, f in repo.files.items():
        data, manifest_path = range_paths(cache, repo_id, commit=repo.commit, filename=name)
        manifest = read_manifest(manifest_path, file=name, size=f.size, sha256=f.sha256)
        if manifest is None:
            continue
        with open(data, "rb") as got, open(f.path, "rb") as want:
            for a, b in manifest.ranges:
                got.seek(a)
                want.seek(a)
                assert got.read(b - a) == want.read(b - a), f"{name}: range {a}-{b} listed in the manifest is wrong"


def _fetch(plan, node: int, cache: str, **options) -> tuple:
    fetcher = NodeFetcher(plan, node, cache_dir=cache, options=FetchOptions(**{**FAST, **options}))
    outcome = fetcher.fetch()
    return outcome, {f.file: f.path for f in outcome.files}


# -- planning ---------------------------------------------------------------------------------------

def test_plan_of_a_hub_repo_downloads_headers_and_config_only(hub, repos):
    path, _ = repos[SHARDED]
    plan = orchestrator.plan(SHARDED, tp=2, nodes=2)
    local = orchestrator.plan(path, tp=2, nodes=2)
    repo = hub.repos[SHARDED]
    assert plan.model.kind == "hub" and plan.model.root is None and plan.model.revision == repo.commit
    assert plan.ranks == local.ranks and plan.nodes == local.nodes  # the same reads as from local files
    assert {f.name: f.sha256 for f in plan.files} == {f.name: _sha256(os.path.join(path, f.name)) for f in plan.files}
    # Shard bytes served: exactly the headers (8-byte length + JSON), each with a range request.
    lfs = [s for s in hub.served() if s.origin == "cdn"]
    assert lfs and all(s.range and s.status == 206 for s in lfs)
    assert _lfs_bytes(hub, SHARDED) == sum(f.header_size for f in plan.files)
    # Hub origin: JSON (API, config, index) only; no shard body ever went through it.
    small = {n: f.size for n, f in repo.files.items() if not f.lfs}
    for s in hub.served(lambda s: s.origin == "hub" and "/resolve/" in s.path):
        name = s.path.split(f"/resolve/{repo.commit}/")[-1]
        assert s.nbytes == 0 or (name in small and s.nbytes == small[name]), s  # shards: redirects only
    assert hub.bytes_served() < 0.15 * plan.totals.checkpoint_bytes


def test_a_cached_plan_of_a_hub_repo_is_not_reused_for_a_new_commit(hub, repos, tmp_path):
    """A new commit with the same weight files (a README added): headers and file hashes match, but the
    plan names the commit its ranks fetch from, so it is a new key."""
    from orchestrator.plan_cache import plan_key
    from workers.sources import resolve_model

    options = dict(tp=2, pp=1, nodes=2, device="cpu")
    key = plan_key(resolve_model(SHARDED), options)
    assert plan_key(resolve_model(SHARDED), options) == key
    first = hub.repos[SHARDED]
    second = shutil.copytree(first.folder, str(tmp_path / "v2"))
    with open(os.path.join(second, "README.md"), "w") as f:
        f.write("a new commit\n")
    try:
        assert hub.add_repo(SHARDED, second) != first.commit
        assert plan_key(resolve_model(SHARDED), options) != key
    finally:
        hub.add_repo(SHARDED, first.folder)
    assert plan_key(resolve_model(SHARDED), options) == key


def test_single_file_repo_and_index_match_local_headers(hub, repos):
    path, _ = repos[SINGLE]
    plan = orchestrator.plan(SINGLE, tp=2, nodes=1)
    assert [f.name for f in plan.files] == ["model.safetensors"]
    from workers.sources.hub import resolve_hub_model

    resolved = resolve_hub_model(SINGLE, revision=hub.repos[SINGLE].commit, cache_dir=None, token=None)
    assert resolved.index.tensors == build_local_index(path).tensors
    assert _lfs_bytes(hub, SINGLE) == plan.files[0].header_size  # headers only; the second plan reuses the kept one


def test_pickle_only_repo_is_refused_without_downloading_it(hub):
    with pytest.raises(CheckpointError, match=r"org/tiny-pickle@[0-9a-f]{12}/pytorch_model.bin is a pickle checkpoint"):
        orchestrator.plan(PICKLE)
    assert _lfs_bytes(hub, PICKLE) == 0


def test_missing_repo_and_revision_are_clear_errors(hub):
    with pytest.raises(CheckpointError, match="org/nope: no such repo"):
        orchestrator.plan("org/nope")
    with pytest.raises(CheckpointError, match="org/tiny-llama: revision 'v9' not found"):
        orchestrator.plan(SHARDED, revision="v9")


def _bytes_read_by(plan, node: int) -> dict[str, set[int]]:
    """Every file byte the node's ranks read, enumerated element by element (independent of ``runs``)."""
    out: dict[str, set[int]] = {}
    for r in plan.nodes[node].ranks:
        for p in plan.ranks[r].params:
            for item in p.reads:
                idx = torch.arange(int(torch.tensor(item.src_shape).prod()) if item.src_shape else 1).reshape(item.src_shape)
                elems = idx[tuple(slice(a, b) for a, b in item.src_box)].flatten().tolist()
                size = torch.empty(0, dtype=getattr(torch, item.src_dtype)).element_size()
                out.setdefault(item.file, set()).update(
                    item.file_offset + e * size + k for e in elems for k in range(size)
                )
    return out


def test_fetch_lists_cover_exactly_the_bytes_read(hub):
    for topology in (dict(tp=2, nodes=2), dict(tp=2, pp=2, nodes=2)):
        plan = orchestrator.plan(SHARDED, **topology)
        header = {f.name: f.header_size for f in plan.files}
        exact_count = coalesced_count = 0
        for node in plan.nodes:
            exact = {i.file: i for i in node_fetch_items(plan, node.node, mode="ranges", max_gap_bytes=0, whole_above=2)}
            read = _bytes_read_by(plan, node.node)
            assert set(exact) == set(read) == {f.file for f in node.fetch}
            for name, item in exact.items():
                fetched = {b for a, z in item.ranges for b in range(a, z)}
                assert fetched == read[name] | set(range(header[name])), (topology, name)
            coalesced = node_fetch_items(plan, node.node, mode="ranges", max_gap_bytes=256, whole_above=2)
            assert sum(i.nbytes for i in coalesced) >= sum(i.nbytes for i in exact.values())
            exact_count += sum(len(i.ranges) for i in exact.values())
            coalesced_count += sum(len(i.ranges) for i in coalesced)
            files_mode = node_fetch_items(plan, node.node, mode="files")
            assert all(i.whole for i in files_mode) and {i.file for i in files_mode} == set(exact)
        if topology.get("pp", 1) == 1:  # row-split tensors: many small runs that coalescing joins
            assert coalesced_count < exact_count / 2, (coalesced_count, exact_count)


def test_range_arithmetic():
    from planning.byte_ranges import merge_ranges, subtract_ranges

    assert merge_ranges([(5, 9), (0, 3), (3, 4), (12, 20)]) == [(0, 4), (5, 9), (12, 20)]
    assert merge_ranges([(5, 9), (0, 3), (12, 20)], gap=2) == [(0, 9), (12, 20)]
    assert subtract_ranges([(0, 10), (20, 30)], [(2, 4), (8, 22), (29, 40)]) == [(0, 2), (4, 8), (22, 29)]
    assert subtract_ranges([(0, 10)], [(0, 10)]) == [] and subtract_ranges([(0, 10)], []) == [(0, 10)]


# -- the node fetcher, in process -------------------------------------------------------------------

def test_whole_files_once_per_node_verified_in_the_standard_cache(hub, repos, tmp_path):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    path, oracle = repos[SHARDED]
    plan = orchestrator.plan(SHARDED, tp=2, nodes=1)
    hub.reset_log()
    cache = str(tmp_path / "node")
    outcomes = []
    threads = [threading.Thread(target=lambda: outcomes.append(_fetch(plan, 0, cache))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(outcomes) == 2
    # Two fetchers on one node's cache: every shard crossed the network once.
    assert _lfs_bytes(hub, SHARDED) == sum(f.size for f in plan.files)
    # Each file was fetched by whichever fetcher took its lock first; the other found it in place.
    assert sum(o.bytes_fetched for o, _ in outcomes) == sum(f.size for f in plan.files)
    for f in plan.files:
        assert sorted(x.from_cache for o, _ in outcomes for x in o.files if x.file == f.name) == [False, True]
    paths = outcomes[0][1]
    assert paths == outcomes[1][1]
    commit = hub.repos[SHARDED].commit
    for f in plan.files:  # huggingface_hub's own lookup finds them: other tools reuse this cache
        assert try_to_load_from_cache(SHARDED, f.name, cache_dir=cache, revision=commit) == paths[f.name]
        assert os.path.basename(os.path.realpath(paths[f.name])) == f.sha256
    assert {r.repo_id for r in scan_cache_dir(cache).repos} == {SHARDED}
    assert_cache_sound(cache, hub, SHARDED)
    checkpoints.assert_state_equal(checkpoints.load_fetched(plan, {0: paths}), oracle)


def test_byte_ranges_fetch_exactly_what_each_node_reads(hub, repos, tmp_path):
    path, oracle = repos[SHARDED]
    plan = orchestrator.plan(SHARDED, tp=2, nodes=2)
    hub.reset_log()
    fetched, total = {}, 0
    for node in plan.nodes:
        cache = str(tmp_path / f"node{node.node}")
        outcome, fetched[node.node] = _fetch(plan, node.node, cache, mode="ranges", max_gap_bytes=0)
        planned = sum(i.nbytes for i in node_fetch_items(plan, node.node, mode="ranges", max_gap_bytes=0))
        assert outcome.bytes_fetched == planned and all(not f.whole for f in outcome.files)
        assert planned <= 1.1 * sum(plan.ranks[r].read_bytes for r in node.ranks)
        total += outcome.bytes_fetched
        # Parts live outside snapshots/: no other tool can take them for whole files.
        assert not os.path.exists(os.path.join(repo_folder(cache, SHARDED), "snapshots", hub.repos[SHARDED].commit, plan.files[0].name))
        assert_cache_sound(cache, hub, SHARDED)
    assert _lfs_bytes(hub, SHARDED) == total <= 1.1 * plan.totals.checkpoint_bytes
    checkpoints.assert_state_equal(checkpoints.load_fetched(plan, fetched), oracle)
    hub.reset_log()
    again, _ = _fetch(plan, 0, str(tmp_path / "node0"), mode="ranges", max_gap_bytes=0)
    assert again.bytes_fetched == 0 and all(f.from_cache for f in again.files) and hub.served() == []


def test_cancel_stops_a_fetch_and_leftovers_of_a_killed_one_are_swept(hub, repos, tmp_path):
    plan = orchestrator.plan(SHARDED, tp=2, nodes=1)
    cache = str(tmp_path / "node")
    first, rest = plan.files[0], plan.files[1:]
    # A killed download leaves huggingface_hub's uniquely named temporary file; the next fetch removes it.
    blobs = os.path.join(repo_folder(cache, SHARDED), "blobs")
    os.makedirs(blobs)
    stale = os.path.join(blobs, f"{first.sha256}.deadbeef.incomplete")
    with open(stale, "wb") as f:
        f.write(b"half a shard")
    hub.inject(Fault(match=hub.lfs_path(SHARDED, rest[0].name), kind="slow", delay_s=1.0))
    fetcher = NodeFetcher(plan, 0, cache_dir=cache, options=FetchOptions(**FAST, workers=1))
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(pytest.raises(CheckpointError, fetcher.fetch)))
    thread.start()
    threading.Timer(0.5, fetcher.cancel).start()  # while the second file is being served slowly
    thread.join(timeout=60)
    assert outcome and "was cancelled before" in str(outcome[0].value)
    assert not os.path.exists(stale)
    served = {s.path for s in hub.served(lambda s: s.origin == "cdn" and s.status == 200)}
    assert hub.lfs_path(SHARDED, rest[-1].name) not in served  # files after the cancel were never asked for
    assert_cache_sound(cache, hub, SHARDED)


@pytest.mark.parametrize("mode", ["files", "ranges"])
@pytest.mark.parametrize("kind", ["status", "cut", "slow", "corrupt"])
def test_one_off_faults_end_in_a_correct_fetch(hub, repos, tmp_path, monkeypatch, mode, kind):
    from huggingface_hub import constants

    path, oracle = repos[SHARDED]
    plan = orchestrator.plan(SHARDED, tp=2, nodes=2)
    victim = max(plan.files, key=lambda f: f.size)
    if kind == "slow":
        monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)  # whole files: huggingface_hub's read timeout
    # huggingface_hub resumes a cut body from the last chunk it wrote (10 MiB); make chunks small enough to see it.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    # Ranges: hit the request that carries the header (its corruption is detectable; no hash covers a range).
    after = victim.size // 3 if mode == "files" else victim.header_size // 2
    fault = hub.inject(Fault(
        match=hub.lfs_path(SHARDED, victim.name), kind=kind, status=503, after=after, delay_s=1.5,
        range_prefix="bytes=0-" if mode == "ranges" else None,
    ))
    hub.reset_log()
    cache = str(tmp_path / "node")
    fetched = {}
    for node in plan.nodes:  # both nodes share one cache here: the second finds its shared bytes in place
        timeout = {"timeout_s": 0.5} if kind == "slow" else {}  # ranges: the fetcher's own read timeout
        _, fetched[node.node] = _fetch(plan, node.node, cache, mode=mode, max_gap_bytes=0, **timeout)
    assert fault.hits == 1
    assert_cache_sound(cache, hub, SHARDED)
    checkpoints.assert_state_equal(checkpoints.load_fetched(plan, fetched), oracle)
    gets = hub.served(lambda s: s.origin == "cdn" and s.path == hub.lfs_path(SHARDED, victim.name))
    if kind == "cut" and mode == "ranges":  # resumed from the very byte where the body stopped
        assert any(s.range and s.range.startswith(f"bytes={after}-") and s.status == 206 for s in gets), gets
    if kind == "cut" and mode == "files":  # resumed from the last chunk huggingface_hub wrote, not restarted
        starts = [int(s.range[len("bytes="):].split("-")[0]) for s in gets if s.range and s.status == 206]
        assert starts and 0 < starts[0] <= after and starts[0] % 4096 == 0, gets
        assert sum(s.nbytes for s in gets) == victim.size + (after - starts[0])
    if kind == "corrupt" and mode == "files":  # the corrupt copy was thrown away and fetched again
        assert sum(s.nbytes for s in gets) == 2 * victim.size


@pytest.mark.parametrize("mode", ["files", "ranges"])
@pytest.mark.parametrize("kind", ["status", "corrupt"])
def test_persistent_faults_fail_naming_the_file_and_leave_nothing_corrupt(hub, repos, tmp_path, mode, kind):
    plan = orchestrator.plan(SHARDED, tp=2, nodes=2)  # node 0 needs half of each file: ranges stay ranges
    victim = plan.files[1]
    if kind == "corrupt" and mode == "ranges":
        hub.inject(Fault(match=hub.lfs_path(SHARDED, victim.name), kind="corrupt", times=-1, range_prefix="bytes=0-"))
    else:
        hub.inject(Fault(match=hub.lfs_path(SHARDED, victim.name), kind=kind, status=500, times=-1))
    cache = str(tmp_path / "node")
    with pytest.raises(CheckpointError) as err:
        _fetch(plan, 0, cache, mode=mode, max_gap_bytes=0)
    message = str(err.value)
    assert victim.name in message
    if kind == "corrupt":
        assert ("sha256" in message) if mode == "files" else ("header" in message)
    else:
        assert "500" in message
    commit = hub.repos[SHARDED].commit
    assert not os.path.lexists(os.path.join(repo_folder(cache, SHARDED), "snapshots", commit, victim.name))
    assert_cache_sound(cache, hub, SHARDED)
    if kind == "corrupt" and mode == "ranges":
        assert not any(os.path.exists(p) for p in range_paths(cache, SHARDED, commit=commit, filename=victim.name))


def test_offline_plans_and_fetches_from_the_cache_and_names_what_is_missing(hub, repos, tmp_path, monkeypatch):
    path, oracle = repos[SHARDED]
    whole, ranges = str(tmp_path / "whole"), str(tmp_path / "ranges")
    online = orchestrator.plan(SHARDED, tp=2, nodes=2, cache_dir=whole)
    orchestrator.plan(SHARDED, tp=2, nodes=2, cache_dir=ranges)  # config, index and ref land there too
    orchestrator.plan(SHARDED, tp=2, nodes=2)  # a plan alone ($MESHLOAD_CACHE_DIR): headers kept, no weights
    _fetch(online, 0, whole)
    _fetch(online, 1, ranges, mode="ranges", max_gap_bytes=0)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_log()
    for cache in (whole, ranges, str(tmp_path / "driver-cache")):  # headers: whole files, parts, kept headers
        offline = orchestrator.plan(SHARDED, tp=2, nodes=2, cache_dir=cache)
        assert offline.ranks == online.ranks and offline.files == online.files
        assert offline.model.revision == online.model.revision
    outcome0, paths0 = _fetch(offline, 0, whole)
    outcome1, paths1 = _fetch(offline, 1, ranges, mode="ranges", max_gap_bytes=0)
    assert outcome0.bytes_fetched == outcome1.bytes_fetched == 0
    checkpoints.assert_state_equal(checkpoints.load_fetched(offline, {0: paths0, 1: paths1}), oracle)

    # What is missing is named: node 0's ranges are not in a cache holding node 1's ...
    with pytest.raises(CheckpointError, match=r"offline mode .* lacks \d+ of the \d+ bytes it needs"):
        _fetch(online, 0, ranges, mode="ranges", max_gap_bytes=0)
    # ... a shard removed from the cache, for planning and for fetching ...
    victim = online.files[2].name
    os.unlink(os.path.join(repo_folder(whole, SHARDED), "snapshots", online.model.revision, victim))
    for p in range_paths(whole, SHARDED, commit=online.model.revision, filename=victim):  # the header planning kept
        os.unlink(p)
    with pytest.raises(CheckpointError, match=rf"offline mode \(HF_HUB_OFFLINE=1\).*lacks 1 item\(s\): {victim} \(not even its header\)"):
        orchestrator.plan(SHARDED, tp=2, nodes=2, cache_dir=whole)
    with pytest.raises(CheckpointError, match=rf"{victim}: offline mode .* not in this node's cache"):
        _fetch(online, 0, whole)
    # ... and a revision never resolved here.
    with pytest.raises(CheckpointError, match=r"revision 'main' is not in the local cache"):
        orchestrator.plan(SHARDED, cache_dir=str(tmp_path / "empty"))
    assert hub.served() == [], "offline mode sent requests"


# -- over a 2-node cluster, each node with its own cache folder ---------------------------------------

FIRST_IP = 20  # 127.0.0.20-21: apart from the shared cluster's addresses


@pytest.fixture(scope="module")
def node_caches(tmp_path_factory):
    return [str(tmp_path_factory.mktemp(f"node{k}-cache")) for k in range(2)]


@pytest.fixture(scope="module")
def hub_cluster(node_caches):
    """A private 2-node cluster; node k's workers see MESHLOAD_CACHE_DIR=node_caches[k]."""
    import ray

    shared = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    if shared:
        ray.shutdown()
    cluster = None
    try:  # the shared cluster is reconnected whatever happens here, or every later test would fail too
        cluster = _start_cluster(2, 2, env_vars=[{"MESHLOAD_CACHE_DIR": c} for c in node_caches], first_ip=FIRST_IP)
        ray.init(address=cluster.address)
        yield {f"127.0.0.{FIRST_IP + k}": c for k, c in enumerate(node_caches)}
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if shared:
            ray.init(address=shared)


@pytest.fixture
def cache_of(hub_cluster):
    """Node IP → that node's cache folder, emptied before the test."""
    for cache in hub_cluster.values():
        shutil.rmtree(cache)
        os.makedirs(cache)
    return hub_cluster


def _check_node_caches(m, cache_of: dict[str, str]) -> None:
    for n in m.fetch_report:
        assert n.cache_dir == cache_of[n.node_ip], f"node {n.node} on {n.node_ip} did not use its own cache"
        ranks_ips = {r.node_ip for r in m.report if r.node == n.node}
        assert ranks_ips == {n.node_ip}, "the fetch did not run on the node of its ranks"
        assert sum(r.bytes_fetched for r in m.report if r.node == n.node) == n.bytes_fetched


@pytest.mark.cluster
def test_tp2_over_two_nodes_each_fetches_only_its_bytes(hub, repos, cache_of, monkeypatch, capsys):
    path, oracle = repos[MEDIUM]
    monkeypatch.setenv("MESHLOAD_FETCH", "ranges")
    monkeypatch.setenv("MESHLOAD_FETCH_MAX_GAP", "0")
    with orchestrator.load(MEDIUM, tp=2, nodes=2, progress=True, timeout_s=300) as m:
        err = capsys.readouterr().err  # not a terminal: plain progress lines per node
        for n in m.fetch_report:
            assert re.search(rf"meshload: node {n.node} \[ranks {n.ranks[0]}\] fetched .* \(100%\)", err), err[-2000:]
        ckpt = m.plan.totals.checkpoint_bytes
        fetched = _lfs_bytes(hub, MEDIUM) - sum(f.header_size for f in m.plan.files)  # minus planning's headers
        print(f"checkpoint {ckpt} B; served in all {hub.bytes_served()} B; nodes fetched "
              f"{[(n.bytes_fetched, sum(m.plan.ranks[r].read_bytes for r in n.ranks)) for n in m.fetch_report]} (fetched, read)")
        assert hub.bytes_served() <= 1.1 * ckpt  # everything: planning and both nodes' fetches
        assert fetched == sum(n.bytes_fetched for n in m.fetch_report) <= 1.1 * ckpt
        for n in m.fetch_report:
            reads = sum(m.plan.ranks[r].read_bytes for r in n.ranks)
            assert reads < n.bytes_fetched <= 1.1 * reads, (n, reads)
            assert set(n.ranged_files) == set(n.files) == {f.file for f in m.plan.nodes[n.node].fetch}
        _check_node_caches(m, cache_of)
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
    for cache in cache_of.values():
        assert_cache_sound(cache, hub, MEDIUM)
        assert os.listdir(os.path.join(repo_folder(cache, MEDIUM), "meshload-ranges"))
    assert wait_until_clean() == ([], [])


@pytest.mark.cluster
def test_update_weights_from_the_hub_fetches_each_nodes_ranges_only(hub, repos, cache_of, monkeypatch):
    """The next checkpoint of a Hub model read in place: each node fetches the ranges its ranks read of
    the new repo (planning reads its headers), and the ranks end up with transformers' state of it."""
    monkeypatch.setenv("MESHLOAD_FETCH", "ranges")
    monkeypatch.setenv("MESHLOAD_FETCH_MAX_GAP", "0")
    with orchestrator.load(MEDIUM, tp=2, nodes=2, progress=False, timeout_s=300) as m:
        before = m.run(lambda ctx: {n: t.data_ptr() for n, t in ctx.params.items()})
        hub.reset_log()
        update = m.update_weights(MEDIUM_NEXT)
        assert m.plan.model.source == MEDIUM_NEXT and m.plan.model.kind == "hub"
        ckpt = m.plan.totals.checkpoint_bytes
        assert hub.bytes_served() <= 1.1 * ckpt  # the new repo's headers and ranges: nothing twice, nothing of the old
        assert update.bytes_read == tuple(r.read_bytes for r in m.plan.ranks)
        assert 0 < sum(update.bytes_fetched) <= 1.1 * ckpt
        assert m.run(lambda ctx: {n: t.data_ptr() for n, t in ctx.params.items()}) == before
        checkpoints.assert_state_equal(m.full_state_dict(), repos[MEDIUM_NEXT][1])
    assert wait_until_clean() == ([], [])


@pytest.mark.cluster
def test_whole_files_once_per_node_through_faults_then_offline_from_cache(hub, repos, cache_of, monkeypatch):
    path, oracle = repos[SHARDED]
    # tp=4 over 2 nodes: two ranks per node, both reading every file. (Which machine hosts which plan node
    # is Ray's choice and may change between loads; with tp across nodes every node needs every file, so
    # the offline reload below works whatever the placement.)
    plan = orchestrator.plan(SHARDED, tp=4, nodes=2)
    first, last = plan.files[0], plan.files[-1]
    hub.inject(Fault(match=hub.lfs_path(SHARDED, first.name), kind="status", status=500))
    cut = hub.inject(Fault(match=hub.lfs_path(SHARDED, last.name), kind="cut", after=last.size // 2))
    hub.reset_log()
    with orchestrator.load(plan, fetch="files", progress=False, timeout_s=300) as m:
        assert cut.hits == 1
        sizes = {f.name: f.size for f in plan.files}
        for n in m.fetch_report:  # one download per file per node, not one per rank
            assert len(n.ranks) == 2 and set(n.files) == set(sizes) and not n.ranged_files
            assert n.bytes_fetched == sum(sizes.values())
        for f in plan.files:
            sha = hub.repos[SHARDED].files[f.name].sha256
            complete = hub.served(lambda s: s.path == f"/lfs/{sha}" and s.status == 200 and s.nbytes == f.size)
            assert len(complete) == 2, (f.name, complete)  # exactly once on each of the 2 nodes
        # What the nodes report is what the server sent, except a cut body's bytes huggingface_hub never
        # handed over (it buffers 10 MiB chunks; the cut came before the first): restarted, not resumed.
        reported, lost = sum(n.bytes_fetched for n in m.fetch_report), hub.bytes_served(lambda s: s.fault == "cut")
        assert reported <= _lfs_bytes(hub, SHARDED) <= reported + lost
        _check_node_caches(m, cache_of)
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
    for cache in cache_of.values():
        assert_cache_sound(cache, hub, SHARDED)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the driver plans from its cache, the nodes fetch from theirs
    hub.reset_log()
    with orchestrator.load(SHARDED, tp=4, nodes=2, fetch="files", progress=False, timeout_s=300) as m:
        assert all(n.bytes_fetched == 0 for n in m.fetch_report) and all(r.bytes_fetched == 0 for r in m.report)
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
    assert hub.served() == []
    assert wait_until_clean() == ([], [])


@pytest.mark.cluster
def test_a_file_the_hub_keeps_failing_is_a_clear_error_and_nothing_is_left(hub, cache_of, monkeypatch):
    monkeypatch.setenv("MESHLOAD_FETCH_ATTEMPTS", "2")
    plan = orchestrator.plan(SHARDED, tp=2, nodes=2)
    victim = plan.files[2].name
    hub.inject(Fault(match=hub.lfs_path(SHARDED, victim), kind="status", status=503, times=-1))
    with pytest.raises(CheckpointError) as err:
        orchestrator.load(plan, progress=False, timeout_s=300)
    message = str(err.value)
    assert f"{victim}: could not fetch" in message and "503" in message, message
    assert re.match(rf"\[Rank \d(, \d)*\] \(node 127\.0\.0\.({FIRST_IP}|{FIRST_IP + 1})\): CheckpointError: ", message), message  # grouped
    for cache in cache_of.values():
        assert_cache_sound(cache, hub, SHARDED)
        assert not os.path.lexists(os.path.join(repo_folder(cache, SHARDED), "snapshots", plan.model.revision, victim))
    assert wait_until_clean() == ([], [])


@pytest.mark.cluster
def test_a_fetcher_killed_mid_fetch_is_started_again_and_the_load_is_bit_exact(hub, repos, cache_of, tmp_path):
    """Node 0's fetcher SIGKILLs itself once its first bytes are on disk, in the middle of a whole-file
    download (huggingface_hub's temporary file left behind); a new fetcher removes that file and fetches."""
    path, oracle = repos[SHARDED]
    markers = tmp_path / "markers"
    markers.mkdir()
    fetcher = fault_workers.fetcher_killed_mid_fetch(str(markers), node=0)
    with orchestrator.load(SHARDED, tp=2, nodes=2, fetch="files", fetcher_cls=fetcher, progress=False, timeout_s=300) as m:
        assert os.listdir(markers) == ["fetcher-node0-0"]  # it really died, once
        assert [n.restarts for n in m.fetch_report] == [1, 0] and [r.restarts for r in m.report] == [0, 0]
        _check_node_caches(m, cache_of)
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
    for cache in cache_of.values():
        assert_cache_sound(cache, hub, SHARDED)
    assert wait_until_clean() == ([], [])


@pytest.mark.cluster
def test_a_rank_killed_while_its_node_fetches_is_restarted_and_the_load_is_bit_exact(hub, repos, cache_of, tmp_path):
    path, oracle = repos[MEDIUM]
    markers = tmp_path / "markers"
    markers.mkdir()
    worker = fault_workers.records_pid(str(markers))
    fetcher = fault_workers.fetcher_killing_rank(str(markers), victim=1, node=1)  # rank 1 is on node 1
    with orchestrator.load(MEDIUM, tp=2, nodes=2, worker_cls=worker, fetcher_cls=fetcher, progress=False, timeout_s=300) as m:
        assert os.path.exists(markers / "fetch-killed-rank1-0")
        assert [r.restarts for r in m.report] == [0, 1]
        _check_node_caches(m, cache_of)
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
    assert wait_until_clean() == ([], [])


@pytest.mark.cluster
@pytest.mark.parametrize("mode, leftover", [("files", ".incomplete"), ("ranges", ".part")])
def test_a_driver_killed_mid_fetch_leaves_no_actor_group_or_partial_file(hub, repos, cache_of, tmp_path, mode, leftover):
    """A driver SIGKILLed while both nodes download (every body held back by the server): Ray removes its
    actors and placement group; what the killed fetchers were writing (huggingface_hub's temporary
    download, a part file with no manifest yet) is removed by their janitors."""
    import ray

    plan = orchestrator.plan(SHARDED, tp=2, nodes=2)  # planned here: the driver only fetches and loads
    (tmp_path / "plan.json").write_text(plan_to_json(plan))
    for f in plan.files:
        hub.inject(Fault(match=hub.lfs_path(SHARDED, f.name), kind="slow", delay_s=60, times=-1, origin="cdn"))
    script = f"""
import sys
sys.path.insert(0, {os.getcwd()!r})
import orchestrator
from planning.plan_json import plan_from_json
plan = plan_from_json(open({str(tmp_path / "plan.json")!r}).read())
orchestrator.load(plan, fetch={mode!r}, progress=False, timeout_s=300)
"""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def partial() -> list[str]:
        return [os.path.join(base, n) for c in cache_of.values() for base, _, names in os.walk(c) for n in names
                if n.endswith(leftover)]

    try:
        deadline = time.monotonic() + 120
        while not partial():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no download ever started"
            time.sleep(0.1)
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_until_clean(timeout_s=60) == ([], [])
    deadline = time.monotonic() + 20
    while partial() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert partial() == []
    for cache in cache_of.values():
        assert_cache_sound(cache, hub, SHARDED)


@pytest.mark.destructive
def test_rank_replaced_on_another_node_reads_from_that_nodes_cache(hub, repos, fresh_cluster, tmp_path, monkeypatch):
    """A node lost mid-load: its rank restarts on the spare node, whose cache is empty; the fetch runs
    again there (only the spare node downloads anything) and the load completes bit-exact."""
    path, oracle = repos[MEDIUM]
    monkeypatch.setenv("MESHLOAD_FETCH", "ranges")
    monkeypatch.setenv("MESHLOAD_FETCH_MAX_GAP", "0")
    caches = [str(tmp_path / f"cache{k}") for k in range(4)]
    for c in caches:
        os.makedirs(c)
    first_ip = FIRST_IP + 10
    cluster = fresh_cluster(4, cpus=1, head_cpus=0, first_ip=first_ip,
                            env_vars=[{"MESHLOAD_CACHE_DIR": c} for c in caches])  # 3 rank nodes, one spare
    cache_of = {f"127.0.0.{first_ip + k}": c for k, c in enumerate(caches)}
    markers = tmp_path / "markers"
    markers.mkdir()
    breaker = remove_a_rank_node_while_loading(cluster, str(markers))
    worker = fault_workers.slow_load(4, marker_dir=str(markers))
    with orchestrator.load(MEDIUM, tp=2, nodes=2, worker_cls=worker, placement_timeout_s=60, progress=False,
                           timeout_s=300) as m:
        breaker["thread"].join(timeout=5)
        assert "error" not in breaker, breaker
        assert sum(r.restarts for r in m.report) == 1
        used = {r.node_ip for r in m.report}
        assert breaker["removed_ip"] not in used and len(used) == 2
        _check_node_caches(m, cache_of)
        moved = next(r for r in m.report if r.restarts)
        # the spare node had nothing: its fetch downloaded what the moved rank reads; the other node's
        # ranks read from its cache, filled once (the fetch ran there again and found everything)
        for n in m.fetch_report:
            reads = sum(m.plan.ranks[r].read_bytes for r in n.ranks)
            assert reads < n.bytes_fetched <= 1.1 * reads, (n, reads)
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
    assert_cache_sound(cache_of[moved.node_ip], hub, MEDIUM)
    assert wait_until_clean() == ([], [])
