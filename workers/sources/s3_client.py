"""What the object-storage source (``workers.sources.s3``, on the driver) and its node fetcher
(``workers.sources.s3_fetcher``, on each node) share: the ``s3://bucket/prefix`` location, the
fingerprint that pins a version, the boto3 client from the standard AWS settings, its errors turned into
``CheckpointError``s naming the bucket and object, and ranged reads retried under the project's one
``RetryPolicy`` (``workers.sources.http``). Its own module so that the source can name its fetcher and the
fetcher these helpers without an import cycle (as ``hub_common`` does for the Hub). boto3 is imported
only inside the functions that talk to the store. No Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from planning.confinement import check_relative_name
from planning.errors import CheckpointError, ConfigError
from workers.sources.http import RETRY_STATUS, RetryPolicy, first_line

SCHEME = "s3://"
# S3's bucket naming rules (3-63 characters: lowercase letters, digits, '.', '-'; no '..'): also safe as a folder name.
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CACHE_DIR = "meshload-s3"  # below the node's cache root: <bucket>/<prefix digest>/{meshload-ranges,meshload-locks}
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
            again, attempt = policy.resume(attempt, exc, progressed=pos > before_pos, retry=transient(exc),
                                           on_retry=None if on_retry is None else lambda a, e: on_retry(a, pos, e))
            if again:
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
