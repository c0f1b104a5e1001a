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

The location, client, errors and ranged reads it shares with the fetcher are ``workers.sources.s3_client``.
Runs on the driver. No Ray.
``S3Prefix`` (end of file) is this source's entry in ``workers.sources.SOURCES``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from planning.checkpoint import choose_layout, index_from_headers
from planning.errors import CheckpointError, ConfigError
from planning.planner import ResolvedModel
from planning.safetensors_header import header_digest, header_length, parse_header
from workers.sources.base import CheckpointSource
from workers.sources.http import RetryPolicy
from workers.sources.hub import weight_map_of
from workers.sources.s3_client import SCHEME, ObjectState, S3Location, fingerprint, head, read_bytes, retrying, s3_client

if TYPE_CHECKING:
    from planning.plan import LoadPlan

HEADER_FETCH_WORKERS = 8
HEADER_RETRY = RetryPolicy(attempts=4)  # listing, config, index and header reads on the driver


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
