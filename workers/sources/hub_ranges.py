"""The Hub fetcher's byte ranges: only the bytes a node's ranks read, into the node's part-file store.

Byte ranges (``FetchOptions(mode="ranges")``) are fetched with HTTP range requests
(``workers.sources.http.ranged_get``) from where the Hub serves the file (the resolve URL's redirect
target, checked against the plan's size and sha256) into a sparse ``.part`` file of the part-file store
(``workers.sources.part_store``), outside ``snapshots/`` so that no other tool mistakes it for the whole
file. Pieces are requested in parallel, at most ``piece_bytes`` each; a range cut short resumes from the
last byte received; an interrupted fetch resumes from the manifest. The Hub's sha256 covers whole files
only, so ranges are checked by length, ``Content-Range`` and the fetched header (parsed, and its digest
equal to the plan's; a part whose header differs is removed); pieces reused from an earlier fetch are
re-hashed against the manifest first. A server that ignores ranges raises ``RangeIgnored`` and the file
falls back to a whole download.

``RangeFiles`` is a part of ``workers.sources.hub_fetcher.NodeFetcher`` (it uses the fetcher's ``repo_id``,
``commit``, ``root``, ``endpoint``, ``token``, ``offline``, ``options``, ``_metadata``, ``_usable_whole``,
``_advance``, ``_check_cancel``, ``_janitor`` and ``_locations``). Runs on each node.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

from planning.errors import CheckpointError
from planning.fetch_list import FetchItem
from workers.sources import hub_cache
from workers.sources.fetch_types import ByteTally, FetchedFile
from workers.sources.http import Target, first_line, ranged_get
from workers.sources.part_store import PartFile, PieceWriter, RangeManifest, check_part_header, fill, read_manifest, verified

log = logging.getLogger("meshload")


class BadPart(Exception):
    """The fetched header of a part file does not parse or match the plan; the part was removed."""


class RangeFiles:
    """Byte-range fetching of ``NodeFetcher`` (see module docstring)."""

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
        manifest = read_manifest(manifest_path, file=item.file, size=item.size, sha256=item.sha256, git_sha1=item.git_sha1)
        where = f"{self.repo_id}@{self.commit[:12]}"
        manifest = verified(manifest, data, manifest_path, item.ranges, where=where) if manifest else None
        manifest = manifest or RangeManifest(item.file, item.size, item.sha256, (), item.git_sha1)
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
        self._janitor.watch_part(
            data=data, manifest=manifest_path,
            lock=hub_cache.lock_path(self.root, self.repo_id, commit=self.commit, filename=item.file, sha256=item.sha256),
        )
        part = PartFile(hub_cache.repo_folder(self.root, self.repo_id), data, manifest_path, manifest)
        tally = ByteTally(self._advance)
        fill(part, missing, lambda a, b: self._fetch_piece(item, part, a, b, tally), piece_bytes=self.options.piece_bytes,
             workers=self.options.workers)
        try:
            check_part_header(part.data, item, origin="the Hub")
        except CheckpointError as exc:
            for p in (manifest_path, data):  # never keep a part whose header does not match the plan
                if os.path.exists(p):
                    os.unlink(p)
            raise BadPart(exc) from None
        return FetchedFile(item.file, data, False, item.nbytes, tally.transfer, False)

    def _fetch_piece(self, item: FetchItem, part: PartFile, start: int, stop: int, tally: ByteTally) -> None:
        """Bytes ``[start, stop)`` into the part file (``workers.sources.http.ranged_get``: a body cut short resumes
        from the last byte received; a signed CDN URL that expired is asked for again once)."""
        from huggingface_hub.utils import build_hf_headers

        piece = PieceWriter(part, start, stop, tally)

        def target(refresh: bool) -> Target:
            url = self._location(item, refresh=refresh)
            same_origin = urlsplit(url)[:2] == urlsplit(self.endpoint)[:2]
            return Target(url, build_hf_headers(token=self.token) if same_origin else {}, signed=not same_origin)

        def on_retry(attempt: int, pos: int, exc: BaseException) -> None:
            log.warning("meshload: %s bytes %d-%d: %s; resuming at %d", item.file, start, stop - 1, exc, pos)

        def describe(exc: BaseException, tries: int) -> CheckpointError:
            return CheckpointError(
                f"{item.file}: bytes {start}-{stop - 1} of {self.repo_id}@{self.commit[:12]} could not be fetched "
                f"after {tries} attempt(s): {first_line(exc)}"
            )

        ranged_get(target, start=start, stop=stop, size=item.size, file=item.file, write=piece.write,
                   timeout_s=self.options.timeout_s, policy=self.options.retry, before=self._check_cancel,
                   on_retry=on_retry, describe=describe)
        piece.done()
