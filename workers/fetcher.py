"""Download what one node's ranks read of a Hub checkpoint into that node's own cache, once per node.

Nodes of a real cluster do not share a disk, and a rank must never download the whole repo for the
slice it reads. The orchestrator runs exactly one ``NodeFetcher`` per node, on that node; it computes
the node's fetch list (``workers.fetch_list``) and makes every listed file or byte range present in
the node-local cache (``workers.sources.hub_cache`` layout), then hands the ranks local paths.

Whole files go through huggingface_hub's own ``hf_hub_download`` (the standard cache layout, its
locks, its resume of a body cut short, Xet when available), wrapped with what a load over many nodes
needs on top:

- once per node: one fetcher per node, and a file lock per file in the cache's ``.locks`` folder, so
  two loads (or two simulated nodes sharing a folder) never download the same file twice;
- retries with exponential backoff on HTTP 408/429/5xx, timeouts, dropped connections and bodies
  cut short (``workers.sources.hub.transient_error``); a missing repo or file fails at once;
- every whole file hashed: sha256 against the Hub's LFS metadata, or the git blob id for a file kept
  in git; a file that fails is removed (snapshot link and blob) before retrying, so no corrupt file is
  ever left where a reader would take it; the blob is made private (0600);
- files already cached are reused without a request; a cached file is re-hashed unless meshload hashed
  this very file before (``workers.sources.hub_cache.stamped``: same inode, size, mtime and ctime) — a blob is
  not trusted for its name; a snapshot entry that does not resolve into the repo's ``blobs/`` is
  removed (the link, never what it points to).

Byte ranges (``FetchOptions(mode="ranges")``) are fetched with HTTP range requests into a sparse
``.part`` file outside ``snapshots/`` (so no other tool mistakes it for the whole file); its manifest
lists the ranges present, each piece with the sha256 of its bytes, and is replaced only after they are
fsync'ed. A range cut short is resumed from the last byte received; an interrupted fetch resumes from
the manifest. The Hub's sha256 covers whole files only, so ranges are checked by length,
``Content-Range`` and the fetched header (parsed, and its digest equal to the plan's); pieces reused
from an earlier fetch are re-hashed against the manifest, and one that differs is fetched again. A
server that ignores ranges makes the file fall back to a whole download.

The plan is checked here too, on the node (``planning.validate.validate_names``): the commit, repo id,
file names and hashes that go into cache paths. The Hub token is not an argument of the actor: it is
given to ``fetch`` (the orchestrator hands it over through Ray's object store), else the node's own
``HF_TOKEN`` / stored login is used.

Offline (``offline=True``): nothing is requested; whatever is missing from the cache is named.

A fetcher killed mid-fetch (its driver killed, the OOM killer) leaves nothing half-written: a watcher
process (``workers.fetch_janitor``) removes its temporary download or unvouched part file at once.

A plain class (no Ray): the orchestrator makes it an actor on each node; tests drive it directly.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from workers.sources import hub_cache
from planning.confinement import confined_path
from planning.errors import CheckpointError, MeshloadError, PlanError
from workers.sources.hub import describe_hub_error, hub_endpoint, hub_offline, transient_error
from planning.plan import LoadPlan
from planning.safetensors_header import header_digest, header_length, parse_header
from planning.validate import validate_names
from workers.fetch_janitor import Janitor, remove_stale_downloads
from workers.fetch_list import DEFAULT_MAX_GAP_BYTES, DEFAULT_WHOLE_ABOVE, MODES, FetchItem, node_fetch_items
from workers.report import node_location

try:  # huggingface_hub ≥ 2 speaks httpx2; 1.x spoke httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx

log = logging.getLogger("meshload")

HASH_CHUNK = 8 << 20
MANIFEST_FLUSH_S = 1.0


@dataclass(frozen=True, slots=True)
class FetchOptions:
    """How a node fetches. ``mode``: ``"ranges"`` (only the bytes read, coalesced; files needed almost
    whole are fetched whole) or ``"files"`` (whole files)."""

    mode: str = "ranges"
    max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES  # ranges closer than this are fetched as one request
    whole_above: float = DEFAULT_WHOLE_ABOVE  # fetch the whole file when the ranges cover this fraction
    max_attempts: int = 6  # per file (whole) or per range piece
    backoff_s: float = 0.5  # first retry delay; doubles up to max_backoff_s (with jitter)
    max_backoff_s: float = 8.0
    timeout_s: float = 30.0  # per range request: connect, and silence between bytes
    workers: int = 4  # files fetched concurrently (and range requests per file)
    piece_bytes: int = 64 << 20  # a range is requested in pieces of at most this
    lock_timeout_s: float = 3600.0  # waiting for another process fetching the same file
    verify: bool = True  # sha256 of whole files against the Hub's LFS metadata

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"fetch mode {self.mode!r}: expected one of {MODES}")
        for name in ("max_attempts", "workers", "piece_bytes"):
            if getattr(self, name) < 1:
                raise PlanError(f"FetchOptions.{name}={getattr(self, name)} must be >= 1")
        if self.max_gap_bytes < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise PlanError(
                f"FetchOptions: max_gap_bytes={self.max_gap_bytes}, timeout_s={self.timeout_s}, "
                f"backoff_s={self.backoff_s} must be non-negative (timeout positive)"
            )

    @staticmethod
    def from_env(**overrides) -> "FetchOptions":
        """Defaults, then the environment, then ``overrides`` that are not None.

        ``MESHLOAD_FETCH``: mode; ``MESHLOAD_FETCH_MAX_GAP``: bytes; ``MESHLOAD_FETCH_ATTEMPTS``: attempts.
        """
        values: dict = {}
        for env, key, parse in (
            ("MESHLOAD_FETCH", "mode", str),
            ("MESHLOAD_FETCH_MAX_GAP", "max_gap_bytes", int),
            ("MESHLOAD_FETCH_ATTEMPTS", "max_attempts", int),
        ):
            raw = os.environ.get(env, "").strip()
            if not raw:
                continue
            try:
                values[key] = parse(raw)
            except ValueError:
                raise PlanError(f"{env}={raw!r}: expected {'a whole number' if parse is int else 'text'}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return FetchOptions(**values)


@dataclass(frozen=True, slots=True)
class FetchedFile:
    """One file on this node: where the ranks read it, and what it cost."""

    file: str
    path: str  # a snapshot path (whole file) or a ``.part`` file (ranges)
    whole: bool
    bytes_needed: int  # planned: the file's size, or its ranges' total
    bytes_fetched: int  # received over the network for it, retries included (whole files: as huggingface_hub
    # reports it; a body cut before its first 10 MiB chunk was handed over is not seen)
    from_cache: bool  # nothing had to be fetched


@dataclass(frozen=True, slots=True)
class NodeFetchOutcome:
    node: int
    files: tuple[FetchedFile, ...]
    cache_dir: str
    seconds: float
    node_id: str
    node_ip: str
    host: str

    @property
    def bytes_fetched(self) -> int:
        return sum(f.bytes_fetched for f in self.files)


class _Cancelled(Exception):
    """Another file of this node failed for good; stop early."""


class _RangesRefused(Exception):
    """The server ignored a range request (HTTP 200): fall back to a whole-file fetch."""


class _BadPart(Exception):
    """The fetched header of a part file does not parse or match the plan; the part was removed."""


class _ByteCounter:
    """Stands in for the tqdm bar ``hf_hub_download`` drives: counts bytes instead of drawing them."""

    def __init__(self, *, sink: "_Tally", **kwargs) -> None:
        self.n = kwargs.get("initial") or 0
        self.total = kwargs.get("total")
        self._sink = sink

    def update(self, n: int = 1) -> None:  # bytes written to the file
        self.n += n
        self._sink.add_written(n)

    def update_transfer(self, n: int) -> None:  # bytes received from the network
        self._sink.add_transfer(n)

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    set_transfer_postfix_str = set_postfix_str
    refresh = clear = close = set_postfix_str

    def __enter__(self) -> "_ByteCounter":
        return self

    def __exit__(self, *exc) -> None:
        pass


class _Tally:
    """Bytes of one file: written (progress) and received (cost); thread-safe."""

    def __init__(self, on_written) -> None:
        self._lock = threading.Lock()
        self.written = 0
        self.transfer = 0
        self._on_written = on_written

    def add_written(self, n: int) -> None:
        with self._lock:
            self.written += n
        self._on_written(n)

    def add_transfer(self, n: int) -> None:
        with self._lock:
            self.transfer += n


class _RangeFile:
    """The ``.part`` file of one partially fetched file and its manifest, shared by the range threads."""

    def __init__(self, base: str, data: str, manifest_path: str, manifest: hub_cache.RangeManifest) -> None:
        self.data = data
        self.manifest_path = manifest_path
        self.manifest = manifest
        self.fd = hub_cache.open_part(base, data, manifest.size)
        self._lock = threading.Lock()
        self._dirty = False
        self._last_flush = time.monotonic()

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def done(self, start: int, stop: int, digest: str) -> None:
        with self._lock:
            self.manifest = self.manifest.adding(start, stop, digest)
            self._dirty = True
            if time.monotonic() - self._last_flush >= MANIFEST_FLUSH_S:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._dirty:
            return
        os.fsync(self.fd)  # the bytes first, then the manifest that vouches for them
        hub_cache.write_manifest(self.manifest_path, self.manifest)
        self._dirty = False
        self._last_flush = time.monotonic()

    def close(self) -> None:
        with self._lock:
            try:
                self._flush_locked()
            finally:
                os.close(self.fd)


def checksum_of(path: str, *, git: bool = False) -> tuple[str, os.stat_result]:
    """The sha256 of the file at ``path`` (``git``: its git blob id, sha1 of ``blob <size>\\0`` + bytes), and
    its ``fstat`` taken before hashing (what a stamp records)."""
    with open(path, "rb") as f:
        state = os.fstat(f.fileno())
        h = hashlib.sha1(b"blob %d\0" % state.st_size) if git else hashlib.sha256()
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest(), state


class NodeFetcher:
    """Fetch node ``node``'s share of ``plan`` (a Hub checkpoint) into this machine's cache. See module docstring.

    ``cache_dir``: else ``$MESHLOAD_CACHE_DIR`` here, else huggingface_hub's default here. ``endpoint``
    and ``offline``: default to what this process sees (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``). The plan's
    names are checked before anything is touched.
    """

    def __init__(
        self,
        plan: LoadPlan,
        node: int,
        *,
        cache_dir: str | None = None,
        endpoint: str | None = None,
        offline: bool | None = None,
        options: FetchOptions | None = None,
    ) -> None:
        if plan.model.kind != "hub" or not plan.model.revision:
            raise PlanError(f"{plan.model.source}: not a Hub checkpoint pinned to a commit; nothing to fetch")
        if not 0 <= node < len(plan.nodes):
            raise PlanError(f"node {node} is not in the plan (nodes 0-{len(plan.nodes) - 1})")
        validate_names(plan)
        self.plan = plan
        self.node = node
        self.repo_id = plan.model.source
        self.commit = plan.model.revision
        self.root = hub_cache.cache_root(cache_dir)
        self.token: str | bool | None = None
        self.endpoint = (endpoint or hub_endpoint()).rstrip("/")
        self.offline = hub_offline() if offline is None else offline
        self.options = options or FetchOptions()
        self.fetch_items = node_fetch_items(
            plan, node, mode=self.options.mode, max_gap_bytes=self.options.max_gap_bytes,
            whole_above=self.options.whole_above,
        )
        self._progress_lock = threading.Lock()
        self._done = 0
        self._cancel = threading.Event()
        self._locations: dict[str, str] = {}
        self._janitor = Janitor()  # removes what this process leaves half-written if it is killed mid-fetch

    # -- introspection -------------------------------------------------------------------------
    def where(self) -> dict:
        return {**node_location(), "cache_dir": self.root}

    def cancel(self) -> None:
        """Ask a running ``fetch`` to stop at the next file, attempt or range boundary (from another thread).

        Downloads in flight finish or fail on their own, cleaning up after themselves, which killing the
        process would not let them do.
        """
        self._cancel.set()

    def progress(self) -> tuple[int, int]:
        """(bytes in place, bytes planned) for this node; callable from another thread during ``fetch``."""
        return self._done, sum(i.nbytes for i in self.fetch_items)

    def _advance(self, n: int) -> None:
        with self._progress_lock:
            self._done += n

    # -- the fetch -----------------------------------------------------------------------------
    def fetch(self, token: str | bool | None = None) -> NodeFetchOutcome:
        """Make every item of this node present locally; returns where each file is and what it cost.

        ``token``: the Hub token (never logged); None: this node's ``HF_TOKEN`` or stored login."""
        self.token = token
        t0 = time.perf_counter()
        results: dict[str, FetchedFile] = {}
        errors: dict[str, BaseException] = {}
        with ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="meshload-fetch") as pool:
            futures = {pool.submit(self._fetch_item, item): item for item in self.fetch_items}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    item = futures[fut]
                    try:
                        results[item.file] = fut.result()
                    except _Cancelled:
                        pass
                    except BaseException as exc:  # noqa: BLE001 - reported below, first one typed
                        errors[item.file] = exc
                        self._cancel.set()
        self._janitor.close()
        if not errors and len(results) < len(self.fetch_items):
            missing = [i.file for i in self.fetch_items if i.file not in results]
            raise CheckpointError(f"fetch into {self.root} was cancelled before {len(missing)} file(s): {missing}")
        if errors:
            first = next(iter(errors.values()))
            if len(errors) == 1 and isinstance(first, MeshloadError):
                raise first
            lines = "; ".join(f"{type(e).__name__}: {e}" for _, e in sorted(errors.items()))
            raise CheckpointError(f"{len(errors)} file(s) could not be fetched into {self.root}: {lines}")
        where = self.where()
        return NodeFetchOutcome(
            node=self.node,
            files=tuple(results[i.file] for i in self.fetch_items),
            cache_dir=self.root,
            seconds=time.perf_counter() - t0,
            node_id=where["node_id"],
            node_ip=where["node_ip"],
            host=where["host"],
        )

    def _fetch_item(self, item: FetchItem) -> FetchedFile:
        with self._file_lock(item):
            if item.whole:
                return self._fetch_whole(item)
            for attempt in range(2):
                try:
                    return self._fetch_ranges(item)
                except _RangesRefused as exc:
                    log.warning("meshload: %s; fetching the whole file instead", exc)
                    return self._fetch_whole(item)
                except _BadPart as exc:
                    if attempt == 1:
                        raise exc.args[0] from None
                    log.warning("meshload: %s; part removed, fetching its ranges again", exc.args[0])
            raise AssertionError("unreachable")

    @contextmanager
    def _file_lock(self, item: FetchItem):
        """Hold this cache's lock for ``item`` (other fetchers of the same file, in any process, wait)."""
        from filelock import Timeout

        lock = hub_cache.file_lock(self.root, self.repo_id, commit=self.commit, filename=item.file, sha256=item.sha256,
                                   timeout=self.options.lock_timeout_s)
        try:
            lock.acquire()
        except Timeout:
            raise CheckpointError(
                f"{item.file}: another process has held {lock.lock_file} for over "
                f"{self.options.lock_timeout_s:g}s while fetching it into {self.root}"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _sleep_before_retry(self, attempt: int) -> None:
        delay = min(self.options.max_backoff_s, self.options.backoff_s * 2**attempt)
        time.sleep(delay * (0.5 + random.random() / 2))

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled()

    # -- whole files -----------------------------------------------------------------------------
    def _usable_whole(self, item: FetchItem) -> str | None:
        """A cached whole copy with the right size and content, else None (a wrong one is removed)."""
        path = hub_cache.snapshot_path(self.root, self.repo_id, commit=self.commit, filename=item.file)
        if not os.path.lexists(path):
            return None
        try:
            confined_path(hub_cache.snapshot_dir(self.root, self.repo_id, commit=self.commit), item.file, what=self.repo_id)
        except CheckpointError as exc:
            log.warning("meshload: %s; removing the snapshot entry (not what it points to)", exc)
            os.unlink(path)
            return None
        problem = self._whole_problem(path, item, known=True)
        if problem is None:
            return path
        log.warning("meshload: cached %s is unusable (%s); removing it", path, problem)
        self._remove_cached(path)
        return None

    def _whole_problem(self, path: str, item: FetchItem, *, known: bool) -> str | None:
        """Why the whole file at ``path`` is not ``item`` (None: it is). ``known``: a file meshload hashed
        before and that has not changed since is not hashed again."""
        try:
            size = os.path.getsize(path)
        except OSError:
            return "dangling link or unreadable file"
        if size != item.size:
            return f"{size} bytes, expected {item.size}"
        if not self.options.verify:
            return None
        expected, git = (item.sha256, False) if item.sha256 else (item.git_sha1, True)
        what = "sha256" if not git else "git blob id"
        if expected is None:
            log.warning("meshload: %s has no checksum in the plan; it cannot be verified", item.file)
            return None
        if known and hub_cache.stamped(self.root, self.repo_id, path, checksum=expected):
            return None
        actual, state = checksum_of(path, git=git)
        if actual != expected:
            return f"{what} {actual}, expected {expected} (Hub metadata)"
        hub_cache.stamp(self.root, self.repo_id, path, checksum=expected, state=state)
        return None

    def _blob_lock(self, sha256: str) -> str:
        """huggingface_hub's lock file for a blob of this repo (held while it downloads the blob)."""
        folder = hub_cache.repo_folder(self.root, self.repo_id)
        return os.path.join(self.root, ".locks", os.path.basename(folder), f"{sha256}.lock")

    def _sweep_incomplete(self, item: FetchItem) -> None:
        """Remove temporary files huggingface_hub left for this blob when a download was killed (not resumable:
        their names are unique per attempt) — only if no process holds huggingface_hub's lock for it."""
        if item.sha256 is None:
            return
        blobs = os.path.join(hub_cache.repo_folder(self.root, self.repo_id), "blobs")
        removed = remove_stale_downloads(blobs_dir=blobs, sha256=item.sha256, lock=self._blob_lock(item.sha256))
        if removed:
            log.warning("meshload: removed %d stale partial download(s) of %s from %s", len(removed), item.file, blobs)

    def _remove_cached(self, path: str) -> None:
        """Remove a snapshot entry and the blob behind it (under huggingface_hub's lock for that blob)."""
        from huggingface_hub.utils import WeakFileLock

        blob = os.path.realpath(path)
        blobs = os.path.join(hub_cache.repo_folder(self.root, self.repo_id), "blobs")
        lock = os.path.join(
            self.root, ".locks", os.path.basename(hub_cache.repo_folder(self.root, self.repo_id)), f"{os.path.basename(blob)}.lock"
        )
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        with WeakFileLock(lock):
            for p in (path, blob) if os.path.dirname(blob) == blobs else (path,):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass

    def _downloaded_problem(self, path: str, item: FetchItem) -> str | None:
        """A file ``hf_hub_download`` returned: where the plan says, inside the repo's blobs, and hashed."""
        expected = hub_cache.snapshot_path(self.root, self.repo_id, commit=self.commit, filename=item.file)
        if os.path.abspath(path) != expected:
            raise CheckpointError(f"{item.file}: huggingface_hub put it at {path}, not at {expected}; refused")
        blob = confined_path(hub_cache.snapshot_dir(self.root, self.repo_id, commit=self.commit), item.file, what=self.repo_id)
        if os.stat(blob).st_uid == os.getuid():
            os.chmod(blob, 0o600)  # gated weights stay private in a shared cache (before hashing: it changes ctime)
        return self._whole_problem(path, item, known=False)

    def _metadata(self, item: FetchItem):
        """The Hub's metadata of ``item`` at the plan's commit (a HEAD request, retried on transient errors)."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(self.repo_id, item.file, revision=self.commit, endpoint=self.endpoint)
        for attempt in range(self.options.max_attempts):
            self._check_cancel()
            try:
                return get_hf_file_metadata(url, token=self.token, timeout=self.options.timeout_s, endpoint=self.endpoint)
            except Exception as exc:  # noqa: BLE001 - classified below
                if attempt + 1 < self.options.max_attempts and transient_error(exc):
                    self._sleep_before_retry(attempt)
                    continue
                raise describe_hub_error(exc, repo_id=self.repo_id, revision=self.commit, what=item.file) from exc
        raise AssertionError("unreachable")

    def _check_metadata(self, item: FetchItem) -> None:
        """Before a whole download: the Hub must serve this file at the plan's commit with the plan's checksum
        (``hf_hub_download`` names the blob after what the server says; a broken mirror is refused here)."""
        meta = self._metadata(item)
        expected = item.sha256 or item.git_sha1
        if meta.commit_hash not in (None, self.commit) or (expected and meta.etag != expected):
            raise CheckpointError(
                f"{item.file}: the Hub at {self.endpoint} serves commit {meta.commit_hash!r} with checksum "
                f"{meta.etag!r}, but the plan has {self.commit} and {expected!r}; refused"
            )

    def _fetch_whole(self, item: FetchItem) -> FetchedFile:
        from huggingface_hub import hf_hub_download

        cached = self._usable_whole(item)
        if cached is not None:
            self._advance(item.nbytes)
            return FetchedFile(item.file, cached, True, item.size, 0, True)
        if self.offline:
            raise CheckpointError(
                f"{item.file}: offline mode (HF_HUB_OFFLINE=1) and it is not in this node's cache {self.root} "
                f"({self.repo_id}@{self.commit[:12]}, {item.size} bytes needed)"
            )
        self._check_metadata(item)
        self._sweep_incomplete(item)
        if item.sha256 is not None:
            blobs = os.path.join(hub_cache.repo_folder(self.root, self.repo_id), "blobs")
            self._janitor.watch_download(blobs_dir=blobs, sha256=item.sha256, lock=self._blob_lock(item.sha256))
        fetched, problem, last_exc = 0, "", None
        for attempt in range(self.options.max_attempts):
            self._check_cancel()
            tally = _Tally(self._advance)
            try:
                path = hf_hub_download(
                    self.repo_id, item.file, revision=self.commit, cache_dir=self.root, token=self.token,
                    endpoint=self.endpoint, tqdm_class=functools.partial(_ByteCounter, sink=tally),
                )
            except Exception as exc:  # noqa: BLE001 - classified below
                fetched += tally.transfer
                self._advance(-tally.written)
                if not transient_error(exc):
                    raise describe_hub_error(exc, repo_id=self.repo_id, revision=self.commit, what=item.file) from exc
                problem, last_exc = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}", exc
                log.warning("meshload: %s: attempt %d failed (%s); retrying", item.file, attempt + 1, problem)
                self._sleep_before_retry(attempt)
                continue
            fetched += tally.transfer or tally.written
            problem = self._downloaded_problem(path, item)
            if problem is None:
                self._advance(item.size - tally.written)
                return FetchedFile(item.file, path, True, item.size, fetched, False)
            self._advance(-tally.written)
            log.warning("meshload: %s: downloaded copy has %s; removed, retrying", item.file, problem)
            self._remove_cached(path)
            last_exc = None
            if attempt + 1 < self.options.max_attempts:
                self._sleep_before_retry(attempt)
        raise CheckpointError(
            f"{item.file}: could not fetch {self.repo_id}@{self.commit[:12]}/{item.file} into {self.root} after "
            f"{self.options.max_attempts} attempts; last problem: {problem}. Nothing partial or corrupt was kept."
        ) from last_exc

    # -- byte ranges -----------------------------------------------------------------------------
    def _location(self, item: FetchItem, *, refresh: bool = False) -> str:
        """Where the file's bytes are served (the resolve URL's redirect target), checked against the plan."""
        if not refresh and item.file in self._locations:
            return self._locations[item.file]
        meta = self._metadata(item)
        if meta.size is not None and meta.size != item.size:
            raise CheckpointError(f"{item.file}: the Hub reports {meta.size} bytes at {self.commit[:12]}, the plan {item.size}")
        if item.sha256 and meta.etag and len(meta.etag) == 64 and meta.etag != item.sha256:
            raise CheckpointError(f"{item.file}: the Hub reports sha256 {meta.etag}, the plan {item.sha256}")
        self._locations[item.file] = meta.location
        return meta.location

    def _fetch_ranges(self, item: FetchItem) -> FetchedFile:
        whole = self._usable_whole(item)
        if whole is not None:  # a whole copy is already here: better than any part
            self._advance(item.nbytes)
            return FetchedFile(item.file, whole, True, item.nbytes, 0, True)
        data, manifest_path = hub_cache.range_paths(self.root, self.repo_id, commit=self.commit, filename=item.file)
        manifest = hub_cache.read_manifest(manifest_path, file=item.file, size=item.size, sha256=item.sha256, git_sha1=item.git_sha1)
        manifest = self._verified(manifest, data, manifest_path, item.ranges) if manifest else None
        manifest = manifest or hub_cache.RangeManifest(item.file, item.size, item.sha256, (), item.git_sha1)
        missing = manifest.missing(item.ranges)
        self._advance(item.nbytes - sum(b - a for a, b in missing))
        if not missing:
            return FetchedFile(item.file, data, False, item.nbytes, 0, True)
        if self.offline:
            raise CheckpointError(
                f"{item.file}: offline mode (HF_HUB_OFFLINE=1) and this node's cache {self.root} lacks "
                f"{sum(b - a for a, b in missing)} of the {item.nbytes} bytes it needs ({len(missing)} range(s), "
                f"first {missing[0][0]}-{missing[0][1]})"
            )
        step = self.options.piece_bytes
        pieces = [(s, min(s + step, b)) for a, b in missing for s in range(a, b, step)]
        self._janitor.watch_part(
            data=data, manifest=manifest_path,
            lock=hub_cache.lock_path(self.root, self.repo_id, commit=self.commit, filename=item.file, sha256=item.sha256),
        )
        part = _RangeFile(hub_cache.repo_folder(self.root, self.repo_id), data, manifest_path, manifest)
        tally = _Tally(self._advance)
        try:
            with ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="meshload-range") as pool:
                futures = [pool.submit(self._fetch_piece, item, part, a, b, tally) for a, b in pieces]
                done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
                for f in not_done:
                    f.cancel()
                for f in futures:
                    if f.done() and not f.cancelled() and f.exception() is not None:
                        raise f.exception()
        finally:
            part.close()  # keeps whatever completed: the next attempt resumes from it
        try:
            self._check_header(part.data, item)
        except CheckpointError as exc:
            for p in (manifest_path, data):  # never keep a part whose header does not match the plan
                if os.path.exists(p):
                    os.unlink(p)
            raise _BadPart(exc) from None
        return FetchedFile(item.file, data, False, item.nbytes, tally.transfer, False)

    def _verified(self, manifest: hub_cache.RangeManifest, data: str, manifest_path: str, needed) -> hub_cache.RangeManifest:
        """``manifest`` without the pieces ``needed`` reuses whose bytes no longer hash as recorded (the manifest
        on disk is rewritten without them, so they are fetched again)."""
        pieces = manifest.touching(needed)
        if not pieces:
            return manifest
        try:
            fd = os.open(data, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            bad = set(pieces)
        else:
            try:
                bad = {p for p in pieces if hub_cache.piece_digest(fd, p[0], p[1]) != p[2]}
            finally:
                os.close(fd)
        if not bad:
            return manifest
        log.warning("meshload: %s: %d cached range(s) of %s no longer match their checksum; fetching them again",
                    f"{self.repo_id}@{self.commit[:12]}", len(bad), manifest.file)
        manifest = manifest.without(bad)
        hub_cache.write_manifest(manifest_path, manifest)
        return manifest

    def _fetch_piece(self, item: FetchItem, part: _RangeFile, start: int, stop: int, tally: _Tally) -> None:
        """Bytes ``[start, stop)`` into the part file; a body cut short resumes from the last byte received."""
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        pos, attempt, refreshed = start, 0, False
        digest = hashlib.sha256()  # of the bytes written, in order (a resumed body continues at ``pos``)
        while pos < stop:
            self._check_cancel()
            url = self._location(item)
            same_origin = urlsplit(url)[:2] == urlsplit(self.endpoint)[:2]
            headers = build_hf_headers(token=self.token) if same_origin else {}
            headers.update({"Range": f"bytes={pos}-{stop - 1}", "Accept-Encoding": "identity"})
            before = pos
            try:
                timeout = httpx.Timeout(self.options.timeout_s)
                with get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as r:
                    if r.status_code in (403, 404, 410) and not same_origin and not refreshed:
                        refreshed = True  # a signed CDN URL may have expired: ask the Hub again
                        self._location(item, refresh=True)
                        continue
                    hf_raise_for_status(r)
                    if r.status_code == 200:
                        raise _RangesRefused(f"{item.file}: {urlsplit(url).netloc} ignored a range request (HTTP 200)")
                    first, _, total = r.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
                    if r.status_code != 206 or not first.startswith(f"{pos}-") or total not in ("*", str(item.size)):
                        raise CheckpointError(
                            f"{item.file}: asked for bytes {pos}-{stop - 1} of {item.size}, got HTTP {r.status_code} "
                            f"with Content-Range {r.headers.get('Content-Range')!r}"
                        )
                    for chunk in r.iter_bytes():
                        chunk = chunk[: stop - pos]
                        part.write(pos, chunk)
                        digest.update(chunk)
                        pos += len(chunk)
                        tally.add_transfer(len(chunk))
                        tally.add_written(len(chunk))
                        if pos >= stop:
                            break
                if pos < stop:
                    raise httpx.RemoteProtocolError(f"body ended after {pos - start} of {stop - start} bytes")
            except (_RangesRefused, _Cancelled, CheckpointError):
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if pos > before:
                    attempt = 0  # progress was made: a fresh budget for the rest, as huggingface_hub does
                if attempt + 1 < self.options.max_attempts and transient_error(exc):
                    log.warning("meshload: %s bytes %d-%d: %s; resuming at %d", item.file, start, stop - 1, exc, pos)
                    self._sleep_before_retry(attempt)
                    attempt += 1
                    continue
                raise CheckpointError(
                    f"{item.file}: bytes {start}-{stop - 1} of {self.repo_id}@{self.commit[:12]} could not be fetched "
                    f"after {attempt + 1} attempt(s): {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                ) from exc
        part.done(start, stop, digest.hexdigest())

    def _check_header(self, path: str, item: FetchItem) -> None:
        """The fetched header must parse, and be the one the plan was made from (size and digest)."""
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = header_length(prefix, file=item.file, file_size=item.size)
            body = f.read(n)
        header = parse_header(body, file=item.file, file_size=item.size)
        if header.header_size != item.header_size or (item.header_sha256 and header_digest(prefix + body) != item.header_sha256):
            raise CheckpointError(
                f"{item.file}: fetched header ({header.header_size} bytes, sha256 {header_digest(prefix + body)[:16]}…) is "
                f"not the plan's ({item.header_size} bytes, sha256 {(item.header_sha256 or '?')[:16]}…); the file changed on the Hub"
            )
