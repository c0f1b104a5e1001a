"""The object-storage node fetcher: the byte ranges one node's ranks read of an ``s3://`` checkpoint, into
that node's cache, once per node.

The orchestrator runs one ``S3NodeFetcher`` per node, on that node (``orchestrator.fetch_stage``; it is
``S3Prefix.fetcher_class()``, ``workers.sources.s3``). What it fetches is what the Hub's fetcher fetches:
``planning.fetch_list.node_fetch_items`` (the exact runs the node's ranks read, plus each header, runs
closer than ``max_gap_bytes`` joined; a file needed almost whole, or ``mode="files"``, as one range of the
whole object), in ranged GETs of at most ``piece_bytes`` (64 MiB), ``workers`` at a time, into the
part-file store (``workers.sources.part_store``: a sparse ``.part`` file and its manifest, each piece with
its sha256, re-hashed when reused). The node's cache::

    <cache>/meshload-s3/<bucket>/<sha256(prefix)[:32]>/meshload-ranges/<fingerprint>/<file>.part|.json
    <cache>/meshload-s3/<bucket>/<sha256(prefix)[:32]>/meshload-locks/<sha1(fingerprint/file)>.lock

``<cache>``: the ``cache_dir`` option, else ``$MESHLOAD_CACHE_DIR``, else huggingface_hub's cache folder, as
seen on the node (``workers.sources.hub_cache.cache_root``). The fingerprint is the plan's ``revision``
(``workers.sources.s3_client.fingerprint``), so objects that changed are fetched into a new folder, never mixed
with the old bytes.

Integrity and confinement, as the Hub fetcher's: the plan's names checked first
(``planning.validate.validate_names``; the bucket by ``S3Location.parse``); before fetching, a HEAD of every
object of the plan must give the plan's fingerprint (else a ``CheckpointError`` naming each object with
its ETag, size and time now); every GET carries ``If-Match`` with the ETag seen (an object replaced
mid-fetch fails, naming it); each response's total size must be the plan's; the fetched header must be
the plan's (parsed, same digest) or the part is removed; meshload's folders and files are private and
opened without following links; one file lock per file (two loads, or simulated nodes sharing a folder,
never fetch the same bytes twice); a fetcher killed mid-fetch leaves no unvouched part
(``workers.fetch_janitor``). Transient failures are retried under the fetch's ``RetryPolicy``
(``FetchOptions.retry``), a body cut short resumed from its last byte.

A plain class (no Ray): the orchestrator makes it an actor on each node; tests drive it directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from planning.errors import CheckpointError
from planning.fetch_list import FetchItem
from planning.plan import LoadPlan
from planning.validate import validate_names
from workers.fetch_janitor import Janitor
from workers.sources.fetch_types import ByteTally, FetchedFile, FetcherState, FetchOptions, NodeFetchOutcome, fetch_each
from workers.sources.hub_cache import cache_root
from workers.sources.part_store import PartFile, PieceWriter, RangeManifest, check_part_header, fill, read_manifest, verified
from workers.sources.private_files import private_dirs
from workers.sources.s3_client import ObjectState, S3Location, fingerprint, head, read_range, s3_client

log = logging.getLogger("meshload")

RANGES_DIR = "meshload-ranges"
LOCKS_DIR = "meshload-locks"


class S3NodeFetcher(FetcherState):
    """Fetch node ``node``'s share of ``plan`` (an ``s3://`` checkpoint) into this machine's cache. See module
    docstring. ``endpoint_url``/``region``: the driver's (``S3Prefix.fetch_settings``), else this node's AWS
    settings."""

    def __init__(
        self,
        plan: LoadPlan,
        node: int,
        *,
        cache_dir: str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        options: FetchOptions | None = None,
    ) -> None:
        validate_names(plan)
        self.location = S3Location.parse(plan.model.source)  # the bucket's grammar: it goes into cache paths
        super().__init__(plan, node, root=cache_root(cache_dir), options=options)
        self.revision = plan.model.revision
        self.folder = self.location.cache_folder(self.root)
        self.endpoint_url = endpoint_url
        self.region = region
        self._janitor = Janitor()

    def fetch(self, token: object = None) -> NodeFetchOutcome:
        """Make every item of this node present in its cache; returns where each file is and what it cost.
        ``token``: unused (the credentials are this node's AWS settings)."""
        t0 = time.perf_counter()
        client = s3_client(endpoint_url=self.endpoint_url, region=self.region)
        try:
            states = self._current_states(client)
            results = fetch_each(self.fetch_items, lambda item: self._fetch_item(client, item, states[item.file]),
                                 workers=self.options.workers, cancel=self._cancel, into=self.root)
        finally:
            self._janitor.close()
        return self._outcome(results, seconds=time.perf_counter() - t0)

    def _current_states(self, client) -> dict[str, ObjectState]:
        """Every object of the plan as it is now, which must be the plan's fingerprint."""
        names = [f.name for f in self.plan.files]
        with ThreadPoolExecutor(max_workers=min(self.options.workers, len(names))) as pool:
            states = dict(zip(names, pool.map(lambda n: head(client, self.location, n, policy=self.options.retry), names)))
        if fingerprint(states) != self.revision:
            sizes = {f.name: f.size for f in self.plan.files}
            now = "; ".join(
                f"{self.location.url(n)}: ETag {s.etag}, {s.size} bytes{'' if s.size == sizes[n] else f' (planned {sizes[n]})'}, "
                f"modified {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(s.modified))}"
                for n, s in sorted(states.items())
            )
            raise CheckpointError(
                f"{self.location.reference}: the objects changed since the plan was made (fingerprint now "
                f"{fingerprint(states)[:12]}, planned {self.revision[:12]}); plan it again. Now: {now}"
            )
        return states

    def _paths(self, item: FetchItem) -> tuple[str, str]:
        base = os.path.join(self.folder, RANGES_DIR, self.revision, *item.file.split("/"))
        return base + ".part", base + ".json"

    def _lock_path(self, item: FetchItem) -> str:
        return os.path.join(self.folder, LOCKS_DIR, hashlib.sha1(f"{self.revision}/{item.file}".encode()).hexdigest() + ".lock")

    @contextmanager
    def _file_lock(self, item: FetchItem):
        """This cache's lock for ``item`` (other fetchers of the same file, in any process, wait)."""
        from filelock import FileLock, Timeout

        path = self._lock_path(item)
        private_dirs(self.root, os.path.dirname(path))
        lock = FileLock(path, timeout=self.options.lock_timeout_s, mode=0o600)
        try:
            lock.acquire()
        except Timeout:
            raise CheckpointError(
                f"{item.file}: another process has held {path} for over {self.options.lock_timeout_s:g}s while "
                f"fetching it into {self.root}"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _fetch_item(self, client, item: FetchItem, state: ObjectState) -> FetchedFile:
        ranges = ((0, item.size),) if item.whole else item.ranges
        with self._file_lock(item):
            data, manifest_path = self._paths(item)
            manifest = read_manifest(manifest_path, file=item.file, size=item.size, sha256=None)
            if manifest is not None:
                manifest = verified(manifest, data, manifest_path, ranges, where=self.location.reference)
            manifest = manifest or RangeManifest(item.file, item.size, None, ())
            missing = manifest.missing(ranges)
            self._advance(item.nbytes - sum(b - a for a, b in missing))
            if not missing:
                return FetchedFile(item.file, data, item.whole, item.nbytes, 0, True)
            private_dirs(self.root, os.path.dirname(data))
            self._janitor.watch_part(data=data, manifest=manifest_path, lock=self._lock_path(item))
            part = PartFile(self.root, data, manifest_path, manifest)
            tally = ByteTally(self._advance)
            fill(part, missing, lambda a, b: self._fetch_piece(client, item, state, part, a, b, tally),
                 piece_bytes=self.options.piece_bytes, workers=self.options.workers)
            try:
                check_part_header(data, item, origin=self.location.url(item.file))
            except CheckpointError:
                for p in (manifest_path, data):  # never keep a part whose header does not match the plan
                    if os.path.exists(p):
                        os.unlink(p)
                raise
            return FetchedFile(item.file, data, item.whole, item.nbytes, tally.transfer, False)

    def _fetch_piece(self, client, item: FetchItem, state: ObjectState, part: PartFile, start: int, stop: int,
                     tally: ByteTally) -> None:
        piece = PieceWriter(part, start, stop, tally)

        def on_retry(attempt: int, pos: int, exc: BaseException) -> None:
            log.warning("meshload: %s bytes %d-%d: %s; resuming at %d", self.location.url(item.file), start, stop - 1, exc, pos)

        read_range(client, self.location, item.file, start=start, stop=stop, size=item.size, write=piece.write,
                   policy=self.options.retry, etag=state.etag, before=self._check_cancel, on_retry=on_retry)
        piece.done()
