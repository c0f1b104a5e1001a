"""The object-storage source: ``s3://bucket/prefix`` (AWS S3 and S3-compatible stores), indexed by range requests.

Clusters keep checkpoints in object storage at least as often as on the Hub. Planning a load of
``s3://bucket/prefix`` needs what it needs from the Hub, and no more:

1. one listing of the prefix (``ListObjectsV2``, the objects directly under ``prefix/``): the layout,
   each object's size, ETag and last-modified time (shards the index names in sub-folders: a HEAD each);
2. ``config.json`` and ``model.safetensors.index.json`` (small GETs);
3. per safetensors object two range requests — ``bytes=0-7`` then exactly the JSON header — validated by
   ``planning.safetensors_header``. Not one byte of tensor data is requested.

Objects have no commit to pin, so the checkpoint's version is a **fingerprint**: the sha1 of each
weight object's name, ETag, size and last-modified second (``fingerprint``). It is the plan's
``revision``; a changed object is a new fingerprint, hence a new plan-cache key, a plan that no longer
matches (``planning.plan_check``), and a new folder in each node's cache. Each node's fetcher
(``workers.sources.s3_fetcher``) checks the objects still have the plan's fingerprint before it fetches,
and every ranged GET carries ``If-Match: <ETag>`` so that all of a file's bytes come from one version.

The client is boto3 (measured against obstore and s3fs: ``docs/BENCHMARKS.md``, "S3 client"), imported
only when an ``s3://`` model is used. It reads the standard AWS settings where it runs: the endpoint
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` or the profile's ``endpoint_url``), the credentials chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the shared
config/credentials files, SSO, container and instance roles) and the region (``AWS_REGION``/
``AWS_DEFAULT_REGION``/the profile's; default ``us-east-1``). The driver's endpoint and region go to the
node fetchers (``fetch_settings``: the fingerprint was read there); credentials are each node's own.
botocore's own retries are off: every request is retried under the project's one ``RetryPolicy``
(``workers.sources.http``) on a transient failure (a 5xx, 408/429, a dropped connection, a body cut
short, resumed from its last byte); anything else fails at once as a ``CheckpointError`` naming the
bucket, the object and the values (no such bucket, no such object, access denied, ...).

Runs on the driver (resolve) and, through ``read_range``/``head``, on each node. No Ray.
``S3Prefix`` (end of file) is this source's entry in ``workers.sources.SOURCES``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from planning.checkpoint import choose_layout, index_from_headers
from planning.confinement import check_relative_name
from planning.errors import CheckpointError, ConfigError
from planning.planner import ResolvedModel
from planning.safetensors_header import header_digest, header_length, parse_header
from workers.sources.base import CheckpointSource
from workers.sources.hub import weight_map_of
from workers.sources.http import RETRY_STATUS, RetryPolicy, first_line

if TYPE_CHECKING:
    from planning.plan import LoadPlan

SCHEME = "s3://"
# S3's bucket naming rules (3-63 characters: lowercase letters, digits, '.', '-'; no '..'): also safe as a folder name.
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CACHE_DIR = "meshload-s3"  # below the node's cache root: <bucket>/<prefix digest>/{meshload-ranges,meshload-locks}
HEADER_FETCH_WORKERS = 8
HEADER_RETRY = RetryPolicy(attempts=4)  # listing, config, index and header reads on the driver
DEFAULT_REGION = "us-east-1"
TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class S3Location:
    """``s3://bucket/prefix``: the bucket, and the key prefix of the checkpoint's objects (no trailing '/')."""

    bucket: str
    prefix: str

    @staticmethod
    def parse(model: str) -> S3Location:
        if not model.startswith(SCHEME):
            raise ConfigError(f"{model}: not an s3:// reference")
        bucket, _, prefix = model[len(SCHEME):].partition("/")
        if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(f"{model}: bucket name {bucket!r} is not a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
        prefix = prefix.strip("/")
        if prefix:
            check_relative_name(prefix, where=model)
        return S3Location(bucket, prefix)

    @property
    def reference(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str) -> str:
        return f"{SCHEME}{self.bucket}/{self.key(name)}"

    def cache_folder(self, root: str) -> str:
        """This prefix's folder in a node's cache ``root`` (the prefix is hashed: any key is a safe folder name)."""
        return os.path.join(root, CACHE_DIR, self.bucket, hashlib.sha256(self.prefix.encode()).hexdigest()[:32])


@dataclass(frozen=True, slots=True)
class ObjectState:
    """What identifies one object's content: its ETag, size and last-modified time (whole seconds, as HEAD gives it)."""

    etag: str
    size: int
    modified: int


def fingerprint(objects: dict[str, ObjectState]) -> str:
    """The checkpoint's version: sha1 (40 hex digits, like a commit) of every weight object's name and state."""
    rows = sorted((name, s.etag, s.size, s.modified) for name, s in objects.items())
    return hashlib.sha1(json.dumps(rows).encode()).hexdigest()


# -- the client and its errors ----------------------------------------------------------------------

def s3_client(*, endpoint_url: str | None = None, region: str | None = None):
    """A boto3 S3 client from the standard AWS settings here (``endpoint_url``/``region``: instead of this
    machine's); botocore's retries off (``RetryPolicy`` does them)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("s3:// models need boto3: pip install 'meshload[s3]' (or pip install boto3)") from None
    session = boto3.session.Session()
    config = Config(retries={"total_max_attempts": 1}, connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S,
                    max_pool_connections=32)
    return session.client("s3", endpoint_url=endpoint_url, region_name=region or session.region_name or DEFAULT_REGION,
                          config=config)


def _code_and_status(exc: BaseException) -> tuple[str | None, int | None]:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    return response.get("Error", {}).get("Code"), response.get("ResponseMetadata", {}).get("HTTPStatusCode")


class ShortBody(Exception):
    """The body of a ranged GET ended before the range did."""


def transient(exc: BaseException) -> bool:
    """Worth retrying: HTTP 408/429/5xx, a dropped or timed-out connection, a body cut short."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error

    transport = (ShortBody, BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError, Urllib3Error)
    if isinstance(exc, transport):
        return True
    return _code_and_status(exc)[1] in RETRY_STATUS


def s3_error(exc: BaseException, *, location: S3Location, name: str | None, what: str, tries: int = 1,
             endpoint: str | None = None) -> CheckpointError:
    """A ``CheckpointError`` naming the bucket and object for a failure of the client (after ``tries`` attempts)."""
    from botocore.exceptions import NoCredentialsError

    url = location.url(name) if name else location.reference
    at = f" at {endpoint}" if endpoint else ""
    code, status = _code_and_status(exc)
    if isinstance(exc, NoCredentialsError):
        return CheckpointError(f"{url}: no AWS credentials found ({what}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                               f"or AWS_PROFILE, or give the machine a role")
    if code == "NoSuchBucket":
        return CheckpointError(f"{url}: no such bucket {location.bucket!r}{at} ({what})")
    if code in ("NoSuchKey", "404") or status == 404:
        return CheckpointError(f"{url}: no such object{at} ({what})")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
        return CheckpointError(f"{url}: access denied{at} ({what}): {code} (HTTP {status}); check the AWS credentials "
                               f"and the bucket's policy")
    if code in ("PreconditionFailed", "412") or status == 412:
        return CheckpointError(f"{url}: the object changed while it was being read ({what}): its ETag is no longer the "
                               f"one it had; plan it again")
    detail = f"HTTP {status} {code}" if status is not None else first_line(exc)
    return CheckpointError(f"{url}: {what} failed after {tries} attempt(s){at}: {detail}")


def retrying(fn: Callable[[], object], *, policy: RetryPolicy, location: S3Location, name: str | None, what: str,
             endpoint: str | None = None):
    """``fn()`` under ``policy`` (transient failures retried); the last failure, or any other, as ``s3_error``."""
    tries = 0

    def attempt():
        nonlocal tries
        tries += 1
        return fn()

    try:
        return policy.call(attempt, retry_if=transient)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated
        raise s3_error(exc, location=location, name=name, what=what, tries=tries, endpoint=endpoint) from exc


def head(client, location: S3Location, name: str, *, policy: RetryPolicy) -> ObjectState:
    """The object's state (``HeadObject``)."""
    meta = retrying(lambda: client.head_object(Bucket=location.bucket, Key=location.key(name)), policy=policy,
                    location=location, name=name, what="HEAD", endpoint=client.meta.endpoint_url)
    return ObjectState(meta["ETag"].strip('"'), int(meta["ContentLength"]), int(meta["LastModified"].timestamp()))


def read_range(
    client, location: S3Location, name: str, *, start: int, stop: int, size: int, write: Callable[[int, bytes], None],
    policy: RetryPolicy, etag: str | None = None, before: Callable[[], None] | None = None,
    on_retry: Callable[[int, int, BaseException], None] | None = None,
) -> int:
    """Bytes ``[start, stop)`` of object ``name`` (``size`` bytes) into ``write(offset, chunk)``: a ranged GET
    (``If-Match: etag`` when given), a body cut short asked again from its last byte (the retry budget
    afresh after progress, as ``workers.sources.http.ranged_get`` does); a ``Content-Range`` naming another
    total size is refused (the object changed). Returns the bytes received."""
    pos, attempt = start, 0
    key = location.key(name)
    while pos < stop:
        if before is not None:
            before()
        before_pos = pos
        try:
            extra = {"IfMatch": f'"{etag}"'} if etag else {}
            r = client.get_object(Bucket=location.bucket, Key=key, Range=f"bytes={pos}-{stop - 1}", **extra)
            total = (r.get("ContentRange") or "").rpartition("/")[2]
            if total != str(size):
                raise CheckpointError(
                    f"{location.url(name)}: asked for bytes {pos}-{stop - 1} of {size}, got Content-Range "
                    f"{r.get('ContentRange')!r}: the object is not the size it was planned at; plan it again"
                )
            body = r["Body"]
            try:
                for chunk in body.iter_chunks(1 << 20):
                    chunk = chunk[: stop - pos]
                    write(pos, chunk)
                    pos += len(chunk)
                    if pos >= stop:
                        break
            finally:
                body.close()
            if pos < stop:
                raise ShortBody(f"body ended after {pos - start} of {stop - start} bytes")
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if pos > before_pos:
                attempt = 0  # progress was made: a fresh budget for the rest
            if attempt + 1 < policy.attempts and transient(exc):
                if on_retry is not None:
                    on_retry(attempt, pos, exc)
                policy.sleep(attempt)
                attempt += 1
                continue
            raise s3_error(exc, location=location, name=name, what=f"bytes {pos}-{stop - 1}", tries=attempt + 1,
                           endpoint=client.meta.endpoint_url) from exc
    return pos - start


def read_bytes(client, location: S3Location, name: str, *, start: int, stop: int, size: int, policy: RetryPolicy) -> bytes:
    """Bytes ``[start, stop)`` of object ``name``, in memory (headers, config)."""
    buf = bytearray(stop - start)

    def write(offset: int, chunk: bytes) -> None:
        buf[offset - start : offset - start + len(chunk)] = chunk

    if stop > start:
        read_range(client, location, name, start=start, stop=stop, size=size, write=write, policy=policy)
    return bytes(buf)


# -- resolve ------------------------------------------------------------------------------------------

def _listing(client, location: S3Location) -> dict[str, ObjectState]:
    """The objects directly under the prefix, by name relative to it."""
    root = location.key("")
    found: dict[str, ObjectState] = {}

    def pages():
        paginator = client.get_paginator("list_objects_v2")
        return list(paginator.paginate(Bucket=location.bucket, Prefix=root, Delimiter="/"))

    for page in retrying(pages, policy=HEADER_RETRY, location=location, name=None, what="listing the prefix",
                         endpoint=client.meta.endpoint_url):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(root):]
            if name:
                found[name] = ObjectState(obj["ETag"].strip('"'), int(obj["Size"]), int(obj["LastModified"].timestamp()))
    return found


def _json_object(client, location: S3Location, name: str, state: ObjectState, *, error: type[Exception]) -> dict:
    raw = read_bytes(client, location, name, start=0, stop=state.size, size=state.size, policy=HEADER_RETRY)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{location.url(name)}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{location.url(name)}: expected a JSON object, got {type(data).__name__}")
    return data


def resolve_s3_model(model: str) -> ResolvedModel:
    """Locate and index ``s3://bucket/prefix`` (see module docstring); headers only."""
    location = S3Location.parse(model)
    where = location.reference
    client = s3_client()
    endpoint = client.meta.endpoint_url
    listing = _listing(client, location)
    if not listing:
        raise CheckpointError(f"{where}: no objects under this prefix at {endpoint}")
    kind, entry = choose_layout(listing, where=where)
    if kind.startswith("pickle"):
        raise CheckpointError(f"{location.url(entry)} is a pickle checkpoint; object-storage checkpoints are read as "
                              f"safetensors only (loading a pickle can run arbitrary code). Convert it to safetensors.")
    if "config.json" not in listing:
        raise ConfigError(f"{location.url('config.json')}: no such object (the prefix holds {sorted(listing)[:20]})")
    config_dict = _json_object(client, location, "config.json", listing["config.json"], error=ConfigError)
    weight_map = None
    if kind == "safetensors-index":
        index = _json_object(client, location, entry, listing[entry], error=CheckpointError)
        weight_map = weight_map_of(index, what=location.url(entry))
        files = sorted(set(weight_map.values()))
    else:
        files = [entry]
    for name in files:
        if name not in listing:  # a shard in a sub-folder, or one the index names but the prefix lacks
            listing[name] = head(client, location, name, policy=HEADER_RETRY)

    def header_of(name: str):
        size = listing[name].size
        prefix = read_bytes(client, location, name, start=0, stop=min(8, size), size=size, policy=HEADER_RETRY)
        n = header_length(prefix, file=location.url(name), file_size=size)
        body = read_bytes(client, location, name, start=8, stop=8 + n, size=size, policy=HEADER_RETRY)
        return replace(parse_header(body, file=name, file_size=size), sha256=header_digest(prefix + body))

    with ThreadPoolExecutor(max_workers=min(HEADER_FETCH_WORKERS, len(files))) as pool:
        headers = dict(zip(files, pool.map(header_of, files)))
    index = index_from_headers(None, headers, weight_map=weight_map, index_name=entry)
    version = fingerprint({name: listing[name] for name in files})
    return ResolvedModel(ref_source=where, kind=S3Prefix.kind, root=None, revision=version, config_dict=config_dict,
                         index=index)


# -- the source --------------------------------------------------------------------------------------

class S3Prefix(CheckpointSource):
    """``s3://bucket/prefix``: resolved by range requests on the driver (above), fetched by each node into its
    own cache (``workers.sources.s3_fetcher.S3NodeFetcher``)."""

    kind = "s3"
    remote = True

    def claims(self, model: str) -> bool:
        return model.startswith(SCHEME)

    def resolve(
        self, model: str, *, revision: str | None = None, cache_dir: str | None = None, token: str | bool | None = None,
        allow_pickle: bool = False,
    ) -> ResolvedModel:
        if revision is not None:
            raise ConfigError(f"{model}: revision={revision!r} is a Hub option; an s3:// prefix is read as it is now")
        return resolve_s3_model(model)

    def resolve_plan(
        self, plan: LoadPlan, *, cache_dir: str | None = None, token: str | bool | None = None, allow_pickle: bool = False
    ) -> ResolvedModel:
        """As the objects are now (no versions to go back to): a changed object is a new fingerprint, which the
        plan check refuses."""
        return resolve_s3_model(plan.model.source)

    def confine(self, plan: LoadPlan, name: str, path: str, *, where: str) -> str:
        """In this node's cache: the part file of ``name`` for the plan's fingerprint, in this prefix's folder."""
        location = S3Location.parse(plan.model.source)
        real = os.path.realpath(path)
        folder = os.path.relpath(location.cache_folder("/"), "/").split("/")  # meshload-s3/<bucket>/<digest>
        expected = [*folder, "meshload-ranges", plan.model.revision, *name.split("/")]
        expected[-1] += ".part"
        parts = real.split(os.sep)
        if len(parts) > len(expected) and parts[-len(expected):] == expected:
            return real
        raise CheckpointError(
            f"{name}: {path} resolves to {real} on {where}, which is not the part file of {location.url(name)} "
            f"in a meshload cache; refused"
        )

    def fetcher_class(self) -> type:
        from workers.sources.s3_fetcher import S3NodeFetcher

        return S3NodeFetcher

    def fetch_settings(self) -> dict:
        """The driver's endpoint and region (where the plan's fingerprint was read); credentials are each node's."""
        client = s3_client()
        return {"endpoint_url": client.meta.endpoint_url, "region": client.meta.region_name}
