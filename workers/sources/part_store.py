"""The part-file store: a file fetched only in part, as a sparse ``.part`` file and its manifest.

A node that needs a slice of a large file keeps just those bytes, at their offsets, in a sparse
full-size ``.part`` file; its JSON manifest lists the pieces present, each ``(start, stop, sha256 of its
bytes)``. The manifest is replaced atomically and only after the bytes it lists are fsync'ed, so a crash
leaves a manifest that under-reports (those ranges are fetched again, never read as garbage); pieces
reused later are re-hashed first (``verified``), and one that no longer matches is dropped.

Where the pair lives is the cache layout's business (``workers.sources.hub_cache.range_paths``); this
module is the format and its I/O, the same for every source that fetches ranges. Byte-range arithmetic
is ``planning.byte_ranges``. Runs on each node (fetch) and on the driver (headers kept while planning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from planning.byte_ranges import merge_ranges, subtract_ranges
from planning.confinement import SHA256_RE
from planning.errors import CheckpointError
from planning.safetensors_header import header_digest, header_length, parse_header
from workers.sources.private_files import open_private, private_dirs, read_private_json, write_private_atomically

if TYPE_CHECKING:
    from planning.fetch_list import FetchItem

log = logging.getLogger("meshload")

MANIFEST_FORMAT = "meshload-ranges/2"
HASH_CHUNK = 8 << 20
MANIFEST_FLUSH_S = 1.0


@dataclass(frozen=True, slots=True)
class RangeManifest:
    """Which byte ranges of ``file`` (``size`` bytes; ``sha256``/``git_sha1`` as the Hub lists it) are present
    in its ``.part`` file: ``pieces`` as fetched, each ``(start, stop, sha256 of those bytes)``."""

    file: str
    size: int
    sha256: str | None
    pieces: tuple[tuple[int, int, str], ...]
    git_sha1: str | None = None

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(merge_ranges([(a, b) for a, b, _ in self.pieces]))

    def missing(self, needed: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> list[tuple[int, int]]:
        return subtract_ranges(needed, self.ranges)

    def touching(self, needed) -> tuple[tuple[int, int, str], ...]:
        """The pieces holding any byte of ``needed``."""
        return tuple(p for p in self.pieces if any(a < p[1] and p[0] < b for a, b in needed))

    def without(self, bad) -> "RangeManifest":
        return RangeManifest(self.file, self.size, self.sha256, tuple(p for p in self.pieces if p not in bad), self.git_sha1)

    def adding(self, start: int, stop: int, digest: str) -> "RangeManifest":
        """With piece ``[start, stop)``; pieces it covers whole are dropped (their bytes were written again)."""
        kept = tuple(p for p in self.pieces if not (start <= p[0] and p[1] <= stop))
        return RangeManifest(self.file, self.size, self.sha256, kept + ((start, stop, digest),), self.git_sha1)


def open_part(base: str, path: str, size: int) -> int:
    """The ``.part`` file at ``path`` (below the repo's cache folder ``base``), opened read-write: created
    private and sparse, ``size`` bytes."""
    private_dirs(base, os.path.dirname(path))
    fd = open_private(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)  # sparse: holes cost no disk
    except BaseException:
        os.close(fd)
        raise
    return fd


def piece_digest(fd: int, start: int, stop: int) -> str:
    """sha256 of bytes ``[start, stop)`` of ``fd``."""
    h = hashlib.sha256()
    pos = start
    while pos < stop:
        chunk = os.pread(fd, min(HASH_CHUNK, stop - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def read_manifest(path: str, *, file: str, size: int, sha256: str | None, git_sha1: str | None = None) -> RangeManifest | None:
    """The manifest at ``path`` if it exists and describes this very file (same size and hashes), else None."""
    data = read_private_json(path)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    if data.get("file") != file or data.get("size") != size:
        return None
    for key, want in (("sha256", sha256), ("git_sha1", git_sha1)):
        if want is not None and data.get(key) not in (None, want):
            return None
    try:
        pieces = tuple((int(a), int(b), str(d)) for a, b, d in data.get("pieces", []))
    except (TypeError, ValueError):
        return None
    if any(not 0 <= a < b <= size or not SHA256_RE.fullmatch(d) for a, b, d in pieces):
        return None
    return RangeManifest(file=file, size=size, sha256=data.get("sha256"), pieces=pieces, git_sha1=data.get("git_sha1"))


def write_manifest(path: str, manifest: RangeManifest) -> None:
    """Replace the manifest atomically (private temp file + fsync + rename). Call only after the data is fsync'ed."""
    body = {
        "format": MANIFEST_FORMAT,
        "file": manifest.file,
        "size": manifest.size,
        "sha256": manifest.sha256,
        "git_sha1": manifest.git_sha1,
        "pieces": [list(p) for p in sorted(manifest.pieces)],
    }
    write_private_atomically(path, json.dumps(body).encode())


class PartFile:
    """One ``.part`` file and its manifest, open for writing (shared by a file's range threads): ``write`` the
    bytes, ``done`` a piece once all its bytes are written; the manifest is rewritten at most every
    ``MANIFEST_FLUSH_S`` and on ``close``, each time after an fsync of the bytes it vouches for."""

    def __init__(self, base: str, data: str, manifest_path: str, manifest: RangeManifest) -> None:
        self.data = data
        self.manifest_path = manifest_path
        self.manifest = manifest
        self.fd = open_part(base, data, manifest.size)
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
        write_manifest(self.manifest_path, self.manifest)
        self._dirty = False
        self._last_flush = time.monotonic()

    def close(self) -> None:
        with self._lock:
            try:
                self._flush_locked()
            finally:
                os.close(self.fd)


class PieceWriter:
    """One piece ``[start, stop)`` of a part file being received: ``write(offset, chunk)`` writes the bytes in
    order, hashes them (a body resumed after a cut continues the hash) and counts them on ``tally`` (a
    ``workers.sources.fetch_types.ByteTally``: received and written); ``done()`` records the piece."""

    def __init__(self, part: PartFile, start: int, stop: int, tally) -> None:
        self.part, self.start, self.stop, self.tally = part, start, stop, tally
        self.digest = hashlib.sha256()

    def write(self, offset: int, chunk: bytes) -> None:
        self.part.write(offset, chunk)
        self.digest.update(chunk)
        self.tally.add_transfer(len(chunk))
        self.tally.add_written(len(chunk))

    def done(self) -> None:
        self.part.done(self.start, self.stop, self.digest.hexdigest())


def fill(part: PartFile, missing, fetch_piece, *, piece_bytes: int, workers: int) -> None:
    """The ``missing`` ranges into ``part``, in pieces of at most ``piece_bytes``: ``fetch_piece(start, stop)`` for
    each (it writes the bytes and calls ``part.done``), ``workers`` at a time; the first failure cancels the
    pieces not begun and is raised. ``part`` is closed whatever happens, keeping what completed (a later fetch
    resumes from it)."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    pieces = [(s, min(s + piece_bytes, b)) for a, b in missing for s in range(a, b, piece_bytes)]
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meshload-range") as pool:
            futures = [pool.submit(fetch_piece, a, b) for a, b in pieces]
            _, not_done = wait(futures, return_when=FIRST_EXCEPTION)
            for f in not_done:
                f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()
    finally:
        part.close()


def verified(manifest: RangeManifest, data: str, manifest_path: str, needed, *, where: str) -> RangeManifest:
    """``manifest`` without the pieces ``needed`` reuses whose bytes no longer hash as recorded (the manifest
    on disk is rewritten without them, so they are fetched again). ``where``: names the source in the warning."""
    pieces = manifest.touching(needed)
    if not pieces:
        return manifest
    try:
        fd = os.open(data, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        bad = set(pieces)
    else:
        try:
            bad = {p for p in pieces if piece_digest(fd, p[0], p[1]) != p[2]}
        finally:
            os.close(fd)
    if not bad:
        return manifest
    log.warning("meshload: %s: %d cached range(s) of %s no longer match their checksum; fetching them again",
                where, len(bad), manifest.file)
    manifest = manifest.without(bad)
    write_manifest(manifest_path, manifest)
    return manifest


def check_part_header(path: str, item: FetchItem, *, origin: str) -> None:
    """The header fetched into the part file at ``path`` must parse, and be the one the plan was made from (size
    and digest); else a ``CheckpointError`` saying the file changed at ``origin`` (the Hub, the bucket)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = header_length(prefix, file=item.file, file_size=item.size)
        body = f.read(n)
    header = parse_header(body, file=item.file, file_size=item.size)
    if header.header_size != item.header_size or (item.header_sha256 and header_digest(prefix + body) != item.header_sha256):
        raise CheckpointError(
            f"{item.file}: fetched header ({header.header_size} bytes, sha256 {header_digest(prefix + body)[:16]}…) is "
            f"not the plan's ({item.header_size} bytes, sha256 {(item.header_sha256 or '?')[:16]}…); the file changed on {origin}"
        )
