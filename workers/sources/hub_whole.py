"""The Hub fetcher's whole files: ``hf_hub_download`` into the node's cache, each file verified.

Whole files go through huggingface_hub's own download (the standard cache layout, its locks, its
resume of a body cut short, Xet when available), wrapped with what a load over many nodes needs:

- before downloading, the Hub must serve the file at the plan's commit with the plan's checksum (a HEAD
  request), so a broken mirror is refused before a byte is written;
- retries under the fetch's one ``RetryPolicy`` (``workers.sources.http``) on transient errors; a
  missing repo or file fails at once;
- every whole file hashed: sha256 against the Hub's LFS metadata, or the git blob id for a file kept in
  git; a file that fails is removed (snapshot link and blob, under huggingface_hub's lock) before
  retrying, so no corrupt file is ever left where a reader would take it; the blob is made private (0600);
- files already cached are reused without a request; a cached file is re-hashed unless meshload hashed
  this very file before (``workers.sources.hub_cache.stamped``: same inode, size, mtime and ctime) — a blob
  is not trusted for its name; a snapshot entry that does not resolve into the repo's ``blobs/`` is
  removed (the link, never what it points to);
- temporary downloads a killed process left are swept, and this process's are watched by the janitor
  (``workers.fetch_janitor``).

``WholeFiles`` is a part of ``workers.sources.hub_fetcher.NodeFetcher`` (it uses the fetcher's
``repo_id``, ``commit``, ``root``, ``endpoint``, ``token``, ``offline``, ``options``, ``_advance``,
``_check_cancel`` and ``_janitor``). Runs on each node.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os

from planning.confinement import confined_path
from planning.errors import CheckpointError
from planning.fetch_list import FetchItem
from workers.fetch_janitor import remove_stale_downloads
from workers.sources import hub_cache
from workers.sources.fetch_types import ByteCounter, ByteTally, Cancelled, FetchedFile
from workers.sources.http import first_line, transient_error
from workers.sources.hub_common import describe_hub_error

log = logging.getLogger("meshload")

HASH_CHUNK = 8 << 20


class _BadDownload(Exception):
    """A downloaded copy is not the plan's file (size or checksum); it was removed."""


def checksum_of(path: str, *, git: bool = False) -> tuple[str, os.stat_result]:
    """The sha256 of the file at ``path`` (``git``: its git blob id, sha1 of ``blob <size>\\0`` + bytes), and
    its ``fstat`` taken before hashing (what a stamp records)."""
    with open(path, "rb") as f:
        state = os.fstat(f.fileno())
        h = hashlib.sha1(b"blob %d\0" % state.st_size) if git else hashlib.sha256()
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest(), state


class WholeFiles:
    """Whole-file fetching of ``NodeFetcher`` (see module docstring)."""

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
        try:
            return self.options.retry.call(
                lambda: get_hf_file_metadata(url, token=self.token, timeout=self.options.timeout_s, endpoint=self.endpoint),
                before=self._check_cancel,
            )
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - translated
            raise describe_hub_error(exc, repo_id=self.repo_id, revision=self.commit, what=item.file) from exc

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
        fetched = 0

        def attempt() -> str:
            nonlocal fetched
            tally = ByteTally(self._advance)
            try:
                path = hf_hub_download(
                    self.repo_id, item.file, revision=self.commit, cache_dir=self.root, token=self.token,
                    endpoint=self.endpoint, tqdm_class=functools.partial(ByteCounter, sink=tally),
                )
            except Exception:
                fetched += tally.transfer
                self._advance(-tally.written)
                raise
            fetched += tally.transfer or tally.written
            problem = self._downloaded_problem(path, item)
            if problem is not None:
                self._advance(-tally.written)
                self._remove_cached(path)
                raise _BadDownload(problem)
            self._advance(item.size - tally.written)
            return path

        def on_retry(n: int, exc: BaseException) -> None:
            if isinstance(exc, _BadDownload):
                log.warning("meshload: %s: downloaded copy has %s; removed, retrying", item.file, exc)
            else:
                log.warning("meshload: %s: attempt %d failed (%s); retrying", item.file, n + 1, first_line(exc))

        try:
            path = self.options.retry.call(
                attempt, retry_if=lambda exc: isinstance(exc, _BadDownload) or transient_error(exc),
                before=self._check_cancel, on_retry=on_retry,
            )
        except (Cancelled, CheckpointError):
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if not isinstance(exc, _BadDownload) and not transient_error(exc):
                raise describe_hub_error(exc, repo_id=self.repo_id, revision=self.commit, what=item.file) from exc
            raise CheckpointError(
                f"{item.file}: could not fetch {self.repo_id}@{self.commit[:12]}/{item.file} into {self.root} after "
                f"{self.options.max_attempts} attempts; last problem: {exc if isinstance(exc, _BadDownload) else first_line(exc)}. "
                f"Nothing partial or corrupt was kept."
            ) from (None if isinstance(exc, _BadDownload) else exc)
        return FetchedFile(item.file, path, True, item.size, fetched, False)
