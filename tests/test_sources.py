"""The checkpoint-source seam (``workers.sources``): which source a reference goes to, where each source
lets a rank read, and the one HTTP helper every source shares (retry policy, ranged GET with resume).

No Ray: sources are plain objects. The ranged GET runs against the Hub look-alike on loopback
(``tests.hub_server``) with a connection dropped mid-body, and against a plain file server that
ignores ``Range`` (what a server answering 200 to a range request looks like).
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import threading

import pytest

import orchestrator
from planning.errors import CheckpointError, ConfigError, PlanError
from tests import checkpoints
from tests.hub_server import Fault, HubServer
from workers.sources import SOURCES, resolve_model, source_for, source_of
from workers.sources.base import CheckpointSource
from workers.sources.hub import HubRepo
from workers.sources.http import RangeIgnored, RetryPolicy, Target, ranged_get
from workers.sources.local import LocalFolder
from workers.sources.s3 import S3Prefix

COMMIT = "a" * 40


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("ckpt")), shard="20KB")


def test_each_reference_goes_to_the_source_that_claims_it(folder, tmp_path):
    assert all(isinstance(s, CheckpointSource) and s.kind == kind for kind, s in SOURCES.items())
    single = tmp_path / "one"
    checkpoints.llama(str(single), shard=None)
    assert isinstance(source_for(folder), LocalFolder)
    assert isinstance(source_for(str(single / "model.safetensors")), LocalFolder)
    assert isinstance(source_for("org/name"), HubRepo) and isinstance(source_for("gpt2"), HubRepo)
    assert isinstance(source_for("s3://bucket/prefix"), S3Prefix) and SOURCES["s3"].remote
    for nobody in ("gs://bucket/prefix", "./missing", "/no/such/folder", "a/b/c"):
        with pytest.raises(ConfigError, match=f"{nobody}: no such file or folder"):
            source_for(nobody)
    plan = orchestrator.plan(folder, tp=2, nodes=2)
    assert source_of(plan) is SOURCES["local"] and resolve_model(folder).kind == plan.model.kind == "local"
    assert source_of(plan).paths_in_place(plan) == {f.name: os.path.join(folder, f.name) for f in plan.files}
    assert SOURCES["local"].fetcher_class() is None and SOURCES["hub"].fetcher_class().__name__ == "NodeFetcher"
    assert SOURCES["s3"].fetcher_class().__name__ == "S3NodeFetcher"
    # What a kind is (fetched, or read in place) is its source's declaration, which a plan cannot change.
    for kind in ("hub", "s3"):
        with pytest.raises(PlanError, match=f"a {kind} checkpoint is fetched by each node .* names the folder"):
            source_of(dataclasses.replace(plan, model=dataclasses.replace(plan.model, kind=kind)))
    with pytest.raises(ConfigError, match="checkpoint kind 'ftp', expected one of"):
        source_of(dataclasses.replace(plan, model=dataclasses.replace(plan.model, kind="ftp")))


def test_a_local_source_lets_a_rank_read_only_the_plans_files_in_its_folder(folder, tmp_path):
    plan = orchestrator.plan(folder, tp=2, nodes=2)
    source, name = source_of(plan), plan.files[0].name
    assert source.confine(plan, name, os.path.join(folder, name), where="node x") == os.path.realpath(os.path.join(folder, name))
    other = plan.files[1].name
    with pytest.raises(CheckpointError, match=f"{name}: asked to read .*{other}, which is not {name} of"):
        source.confine(plan, name, os.path.join(folder, other), where="node x")
    planted = tmp_path / "planted.safetensors"
    planted.symlink_to("/etc/passwd")
    with pytest.raises(CheckpointError, match=f"{name}: asked to read {planted}, which is not {name} of"):
        source.confine(plan, name, str(planted), where="node x")


def test_a_hub_source_lets_a_rank_read_only_blobs_and_parts_of_its_repo(folder, tmp_path):
    plan = orchestrator.plan(folder, tp=2, nodes=2)
    from dataclasses import replace

    hub_plan = replace(plan, model=replace(plan.model, kind="hub", source="org/name", root=None, revision=COMMIT))
    source, name = SOURCES["hub"], plan.files[0].name
    repo = tmp_path / "models--org--name"
    blob = repo / "blobs" / ("b" * 64)
    part = repo / "meshload-ranges" / COMMIT / f"{name}.part"
    for p in (blob, part):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    snapshot = repo / "snapshots" / COMMIT / name
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    assert source.confine(hub_plan, name, str(snapshot), where="node x") == str(blob)
    assert source.confine(hub_plan, name, str(part), where="node x") == str(part)
    wrong_part = repo / "meshload-ranges" / ("c" * 40) / f"{name}.part"  # another commit's part
    wrong_part.parent.mkdir(parents=True)
    wrong_part.write_bytes(b"x")
    for path in (wrong_part, os.path.join(folder, name)):
        with pytest.raises(CheckpointError, match="which is neither a blob of models--org--name nor its range store; refused"):
            source.confine(hub_plan, name, str(path), where="node x")


def test_one_retry_policy_backs_off_exponentially_with_jitter_and_retries_only_transient_errors():
    from workers.sources.http import httpx

    policy = RetryPolicy(attempts=4, backoff_s=0.5, max_backoff_s=1.5)
    for attempt, cap in ((0, 0.5), (1, 1.0), (2, 1.5), (5, 1.5)):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert cap / 2 <= min(delays) and max(delays) <= cap and len(set(delays)) > 1
    fast = RetryPolicy(attempts=3, backoff_s=0.0)
    calls, retried = [], []

    def dropped():
        calls.append(1)
        raise httpx.RemoteProtocolError("peer closed the connection")

    with pytest.raises(httpx.RemoteProtocolError):
        fast.call(dropped, on_retry=lambda n, exc: retried.append(n))
    assert len(calls) == 3 and retried == [0, 1]
    calls.clear()
    with pytest.raises(ValueError):
        fast.call(lambda: calls.append(1) or (_ for _ in ()).throw(ValueError("not transient")))
    assert len(calls) == 1


@pytest.fixture(scope="module")
def hub(folder):
    server = HubServer().start()
    try:
        server.add_repo("org/tiny", folder)
        yield server
    finally:
        server.stop()


def test_a_ranged_get_cut_short_resumes_from_the_last_byte_received(hub, folder):
    name = max(hub.repos["org/tiny"].files, key=lambda n: hub.repos["org/tiny"].files[n].size)
    f = hub.repos["org/tiny"].files[name]
    url = hub.cdn_url + hub.lfs_path("org/tiny", name)
    start, stop = 100, f.size - 50
    hub.inject(Fault(match=hub.lfs_path("org/tiny", name), kind="cut", after=1000))
    hub.reset_log()
    got = bytearray(stop - start)
    retried = []

    def write(offset: int, chunk: bytes) -> None:
        got[offset - start : offset - start + len(chunk)] = chunk

    n = ranged_get(lambda refresh: Target(url, {}), start=start, stop=stop, size=f.size, file=name, write=write,
                   timeout_s=10, policy=RetryPolicy(attempts=3, backoff_s=0.0),
                   on_retry=lambda attempt, pos, exc: retried.append(pos))
    with open(os.path.join(folder, name), "rb") as want:
        want.seek(start)
        assert n == stop - start and bytes(got) == want.read(stop - start)
    ranges = [s.range for s in hub.served(lambda s: s.origin == "cdn")]
    assert retried == [start + 1000] and ranges == [f"bytes={start}-{stop - 1}", f"bytes={start + 1000}-{stop - 1}"]


def test_a_server_that_ignores_ranges_is_refused_before_its_body_is_read(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        name = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))[0]
        size = os.path.getsize(os.path.join(folder, name))
        url = f"http://127.0.0.1:{server.server_port}/{name}"
        written = []
        with pytest.raises(RangeIgnored, match=f"{name}: 127.0.0.1:{server.server_port} ignored a range request"):
            ranged_get(lambda refresh: Target(url, {}), start=0, stop=8, size=size, file=name,
                       write=lambda offset, chunk: written.append(chunk), timeout_s=10, policy=RetryPolicy(attempts=1))
        assert written == []
    finally:
        server.shutdown()
        server.server_close()
