"""Object storage as a source: ``s3://bucket/prefix`` planned from headers read by range, fetched per node,
loaded bit for bit; faults give typed errors naming the object; a changed object is a new version.

Everything goes through the real client (boto3) against a real S3-compatible server on loopback: moto's
server mode behind a fault proxy (``tests/s3_server.py``), serving checkpoints written by transformers'
``save_pretrained``; what was requested is asserted from the proxy's log.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import orchestrator
from planning.checkpoint import build_local_index
from planning.errors import CheckpointError, ConfigError, PlanError
from planning.fetch_list import node_fetch_items
from planning.plan_check import check_plan_matches
from tests import checkpoints
from tests.conftest import wait_until_clean
from tests.s3_server import Fault, S3Server
from workers.sources import resolve_model, source_of
from workers.sources.fetch_types import FetchOptions
from workers.sources.s3_fetcher import S3NodeFetcher

BUCKET = "ckpt"
TINY, SINGLE = f"s3://{BUCKET}/models/tiny", f"s3://{BUCKET}/models/single"
FAST = dict(backoff_s=0.01, max_backoff_s=0.05, max_attempts=3)


# -- fixtures -------------------------------------------------------------------------------------

def _upload(client, folder: str, prefix: str) -> None:
    for name in os.listdir(folder):
        client.upload_file(os.path.join(folder, name), BUCKET, f"{prefix}/{name}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ckpts(s3, tmp_path_factory):
    """The local folders uploaded under each prefix, with transformers' state, logits and greedy tokens."""
    tiny = checkpoints.llama(str(tmp_path_factory.mktemp("tiny")))  # six shards and an index
    single = checkpoints.llama(str(tmp_path_factory.mktemp("single")), shard=None)
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    out = {}
    for ref, folder in ((TINY, tiny), (SINGLE, single)):
        _upload(client, folder, ref.split("/", 3)[3])
        model = checkpoints.reference(folder)
        out[ref] = (folder, model.state_dict(), *checkpoints.expected_outputs(model))
    return out


@pytest.fixture(autouse=True)
def s3_env(s3, monkeypatch):
    """The driver's AWS settings point at the loopback server (the nodes get the endpoint from the driver)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3.faults.clear()
    s3.served.clear()


def _fetch(plan, node: int, cache: str, s3: S3Server, **options):
    fetcher = S3NodeFetcher(plan, node, cache_dir=cache, endpoint_url=s3.endpoint, options=FetchOptions(**{**FAST, **options}))
    outcome = fetcher.fetch()
    return outcome, {f.file: f.path for f in outcome.files}


def _tensor_bytes_requested(s3: S3Server, plan) -> int:
    """Bytes of safetensors objects served past their headers."""
    headers = {f.name: f.header_size for f in plan.files}
    total = 0
    for s in s3.served:
        name = s.path.rsplit("/", 1)[-1]
        if s.method == "GET" and name in headers and s.range:
            a, b = (int(x) for x in s.range.removeprefix("bytes=").split("-"))
            total += max(0, min(b + 1, a + s.body_bytes) - max(a, headers[name]))
    return total


# -- planning -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref", [TINY, SINGLE])
def test_plan_of_a_prefix_reads_headers_by_range_and_no_tensor_byte(s3, ckpts, ref):
    folder = ckpts[ref][0]
    plan = orchestrator.plan(ref, tp=2, nodes=2)
    local = build_local_index(folder)
    assert plan.model.kind == "s3" and plan.model.remote and plan.model.root is None
    assert plan.model.source == ref and len(plan.model.revision) == 40
    assert [(f.name, f.size, f.header_size, f.header_sha256) for f in plan.files] == [
        (f.name, f.size, f.header_size, f.header_sha256) for f in local.files]
    assert _tensor_bytes_requested(s3, plan) == 0
    gets = [s for s in s3.served if s.method == "GET" and s.path.endswith(".safetensors")]
    assert len(gets) == 2 * len(plan.files) and all(s.range for s in gets)  # 8 bytes, then exactly the header
    assert source_of(plan).kind == "s3"


def test_the_s3_client_is_imported_only_for_an_s3_model(ckpts, monkeypatch):
    """The registry imports no client; a local plan never makes one (accelerate, which planning uses for its size
    parser, imports boto3 by itself when it is installed, so the check is on our code's calls)."""
    code = "import sys, orchestrator, workers.sources; print(sorted(m for m in sys.modules if m.startswith(('boto', 'obstore'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    from workers.sources import s3 as s3_module

    def no_client(**kwargs):
        raise AssertionError("an S3 client was made for a local checkpoint")

    monkeypatch.setattr(s3_module, "s3_client", no_client)
    assert orchestrator.plan(ckpts[TINY][0], tp=2, nodes=2).model.kind == "local"


def test_missing_bucket_prefix_and_objects_are_errors_naming_them(s3, ckpts):
    with pytest.raises(CheckpointError, match=r"s3://no-such-bucket/x: no such bucket 'no-such-bucket'"):
        orchestrator.plan("s3://no-such-bucket/x")
    with pytest.raises(CheckpointError, match=rf"s3://{BUCKET}/models/none: no objects under this prefix"):
        orchestrator.plan(f"s3://{BUCKET}/models/none")
    with pytest.raises(ConfigError, match="not a valid S3 bucket name"):
        orchestrator.plan("s3://Bad_Bucket/x")
    client = s3.client()
    folder = ckpts[TINY][0]
    _upload(client, folder, "models/lacking")
    client.delete_object(Bucket=BUCKET, Key="models/lacking/model-00003-of-00006.safetensors")
    with pytest.raises(CheckpointError, match=rf"s3://{BUCKET}/models/lacking/model-00003-of-00006.safetensors: no such object"):
        orchestrator.plan(f"s3://{BUCKET}/models/lacking")
    client.delete_object(Bucket=BUCKET, Key="models/lacking/config.json")
    with pytest.raises(ConfigError, match=rf"s3://{BUCKET}/models/lacking/config.json: no such object"):
        orchestrator.plan(f"s3://{BUCKET}/models/lacking")


def test_access_denied_and_server_errors_name_the_object(s3, ckpts):
    shard = "models/tiny/model-00002-of-00006.safetensors"
    s3.faults.append(Fault(shard, status=403, code="AccessDenied", times=-1))
    with pytest.raises(CheckpointError, match=rf"s3://{BUCKET}/{shard}: access denied .*AccessDenied \(HTTP 403\)"):
        orchestrator.plan(TINY)
    s3.faults[:] = [Fault(shard, status=503, code="SlowDown", times=2)]  # transient: retried, then it plans
    assert orchestrator.plan(TINY).model.revision == resolve_model(TINY).revision
    s3.faults[:] = [Fault(shard, status=500, code="InternalError", times=-1)]
    with pytest.raises(CheckpointError, match=rf"s3://{BUCKET}/{shard}: .* failed after 4 attempt\(s\) .*HTTP 500 InternalError"):
        orchestrator.plan(TINY)


# -- fetching on a node (no Ray) --------------------------------------------------------------------

def test_each_node_fetches_exactly_its_ranges_and_the_ranks_read_them_bit_for_bit(s3, ckpts, tmp_path):
    folder, oracle = ckpts[TINY][:2]
    plan = orchestrator.plan(TINY, tp=2, nodes=2)
    paths = {}
    for node in range(2):
        s3.served.clear()
        outcome, paths[node] = _fetch(plan, node, str(tmp_path / f"node{node}"), s3, max_gap_bytes=0)
        items = {i.file: i for i in node_fetch_items(plan, node, max_gap_bytes=0)}
        asked = sum(s.body_bytes for s in s3.served if s.method == "GET")
        assert asked == outcome.bytes_fetched == sum(i.nbytes for i in items.values())
        assert sum(1 for s in s3.served if s.method == "HEAD") == len(plan.files)  # the fingerprint, checked
        for f in outcome.files:  # in the cache's folder for this prefix and version, confined there
            assert source_of(plan).confine(plan, f.file, f.path, where="here") == os.path.realpath(f.path)
            with open(f.path, "rb") as got, open(os.path.join(folder, f.file), "rb") as want:
                for a, b in items[f.file].ranges:
                    got.seek(a)
                    want.seek(a)
                    assert got.read(b - a) == want.read(b - a)
    checkpoints.assert_state_equal(checkpoints.load_fetched(plan, paths), oracle)
    s3.served.clear()
    again, _ = _fetch(plan, 0, str(tmp_path / "node0"), s3, max_gap_bytes=0)  # the node's cache is reused: only HEADs
    assert all(f.from_cache for f in again.files) and again.bytes_fetched == 0
    assert {s.method for s in s3.served} == {"HEAD"}
    with pytest.raises(CheckpointError, match="refused"):
        source_of(plan).confine(plan, plan.files[0].name, os.path.join(folder, plan.files[0].name), where="here")


def test_bodies_cut_short_resume_and_server_errors_retry_then_fail_naming_the_object(s3, ckpts, tmp_path):
    oracle = ckpts[SINGLE][1]
    plan = orchestrator.plan(SINGLE, tp=2, nodes=1)
    key = "models/single/model.safetensors"
    s3.faults[:] = [Fault(key, kind="cut", after=5000, times=1), Fault(key, status=503, code="SlowDown", times=1)]
    _, paths = _fetch(plan, 0, str(tmp_path / "ok"), s3, piece_bytes=1 << 20)
    assert all(f.times == 0 for f in s3.faults)  # both faults happened
    resumed = [s for s in s3.served if s.method == "GET" and s.status == 206]
    assert any(s.range and not s.range.startswith("bytes=0-") for s in resumed)  # asked again from the cut
    checkpoints.assert_state_equal(checkpoints.load_fetched(plan, {0: paths}), oracle)
    for fault in (Fault(key, kind="cut", after=0, times=-1), Fault(key, status=502, code="BadGateway", times=-1)):
        s3.faults[:] = [fault]
        cache = tmp_path / f"bad-{fault.kind}"
        with pytest.raises(CheckpointError, match=rf"s3://{BUCKET}/{key}: bytes \d+-\d+ failed after 3 attempt\(s\)"):
            _fetch(plan, 0, str(cache), s3)
        leftovers = [os.path.join(d, n) for d, _, ns in os.walk(cache) for n in ns if n.endswith(".json")]
        assert not leftovers or all("meshload-locks" in p for p in leftovers)  # no manifest vouching for bad bytes


def test_a_changed_object_is_a_new_version_for_plans_and_node_caches(s3, ckpts, tmp_path):
    folder = ckpts[TINY][0]
    client = s3.client()
    _upload(client, folder, "models/changing")
    ref = f"s3://{BUCKET}/models/changing"
    before = resolve_model(ref)
    plan = orchestrator.plan(ref, tp=2, nodes=2)
    cache = str(tmp_path / "cache")
    first, _ = _fetch(plan, 0, cache, s3)
    assert not any(f.from_cache for f in first.files)
    # The next training step: one shard rewritten with other values (same header, so a new ETag only).
    shard = "model-00002-of-00006.safetensors"
    data = bytearray(open(os.path.join(folder, shard), "rb").read())
    n = int.from_bytes(data[:8], "little")
    data[8 + n:] = bytes(len(data) - 8 - n)
    client.put_object(Bucket=BUCKET, Key=f"models/changing/{shard}", Body=bytes(data))
    after = resolve_model(ref)
    assert after.revision != before.revision
    assert [f.header_sha256 for f in after.index.files] == [f.header_sha256 for f in before.index.files]
    with pytest.raises(PlanError, match="plan it again"):
        check_plan_matches(plan, after)  # a cached plan of the old objects is not used
    from orchestrator.plan_cache import plan_key

    assert plan_key(after, {"tp": 2}) != plan_key(before, {"tp": 2})
    with pytest.raises(CheckpointError, match=rf"{ref}: the objects changed since the plan was made .*{shard}: ETag"):
        _fetch(plan, 0, cache, s3)  # a node never fetches the new bytes for the old plan
    new_plan = orchestrator.plan(ref, tp=2, nodes=2)
    second, paths = _fetch(new_plan, 0, cache, s3)
    assert not any(f.from_cache for f in second.files)  # a new folder in the node's cache, nothing mixed
    assert {os.path.dirname(f.path) for f in second.files}.isdisjoint({os.path.dirname(f.path) for f in first.files})
    got = paths[shard]
    with open(got, "rb") as f:
        for a, b in node_fetch_items(new_plan, 0)[1].ranges or ((0, len(data)),):
            f.seek(a)
            assert f.read(b - a) == bytes(data[a:b])


# -- loads on the cluster ---------------------------------------------------------------------------

@pytest.mark.cluster
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_load_from_s3_on_the_cluster_matches_transformers(ray_cluster, s3, ckpts, tmp_path, tp, pp):
    folder, oracle, logits, tokens = ckpts[TINY]
    with orchestrator.load(TINY, tp=tp, pp=pp, nodes=2, cache_dir=str(tmp_path / "cache"), timeout_s=300,
                           progress=False) as m:
        assert m.plan.model.kind == "s3" and len(m.fetch_report) == 2
        assert sum(n.bytes_fetched for n in m.fetch_report) > 0
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
        if tp == 1:
            assert torch.equal(m.logits(checkpoints.PROMPT), logits)  # one rank per stage: the same arithmetic
        checkpoints.assert_inference_matches(m, logits, tokens)
    assert wait_until_clean() == ([], [])
