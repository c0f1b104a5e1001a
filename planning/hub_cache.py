"""Where a Hub checkpoint lives on one machine's disk: huggingface_hub's cache plus meshload's range store.

Whole files are kept exactly where ``huggingface_hub`` keeps them, so ``transformers``, ``hf`` and any
other tool reuse them::

    <cache>/models--org--name/blobs/<sha256>                        the bytes (content-addressed)
    <cache>/models--org--name/snapshots/<commit>/<file> -> blob     what a reader opens
    <cache>/models--org--name/refs/<branch>                         branch → commit

A file fetched only in part (byte-range fetching: a node that needs a slice of a large shard) must
never appear under ``snapshots/``, where another tool would take it for the whole file. It lives in
meshload's own folder of the same repo (removing the repo's cache folder removes it too)::

    <cache>/models--org--name/meshload-ranges/<commit>/<file>.part   sparse, full-size; only listed ranges valid
    <cache>/models--org--name/meshload-ranges/<commit>/<file>.json   manifest: size, sha256, ranges present

The manifest is replaced atomically and only after the bytes it lists are on disk (fsync), so a crash
leaves a manifest that under-reports: those ranges are fetched again, never read as garbage.

Which cache folder: the ``cache_dir`` option, else ``MESHLOAD_CACHE_DIR``, else huggingface_hub's own
default (``HF_HUB_CACHE``/``HF_HOME``) — each read where this code runs (the driver for planning, each
node for fetching), so nodes without a shared disk each use their own.

Writers of a file's entries (node fetchers, and planning, which keeps the headers it read) hold one
file lock per file, in the cache's ``.locks`` folder next to huggingface_hub's own.

Path, lock and manifest helpers; no network. Used on the driver (planning, offline planning) and on
every node (``workers.fetcher``).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass

from planning.errors import CheckpointError

CACHE_ENV = "MESHLOAD_CACHE_DIR"
RANGES_DIR = "meshload-ranges"
MANIFEST_FORMAT = "meshload-ranges/1"
COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    """The cache folder used here: ``cache_dir``, else ``$MESHLOAD_CACHE_DIR``, else huggingface_hub's default."""
    chosen = cache_dir or os.environ.get(CACHE_ENV)
    if not chosen:
        from huggingface_hub import constants

        chosen = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    return os.path.abspath(os.path.expanduser(os.fspath(chosen)))


def repo_folder(root: str, repo_id: str) -> str:
    return os.path.join(root, "models--" + repo_id.replace("/", "--"))


def check_repo_filename(name: str, *, where: str) -> str:
    """Refuse a repo file name that could escape the repo folder (absolute, ``..``, backslashes)."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise CheckpointError(f"{where}: file name {name!r} is not a plain relative path inside the repo")
    return name


def snapshot_path(root: str, repo_id: str, *, commit: str, filename: str) -> str:
    check_repo_filename(filename, where=repo_id)
    return os.path.join(repo_folder(root, repo_id), "snapshots", commit, *filename.split("/"))


def ref_commit(root: str, repo_id: str, *, revision: str | None) -> str | None:
    """The commit a revision names in this cache: itself if it is a commit sha, else ``refs/<revision>``."""
    revision = revision or "main"
    if COMMIT_RE.fullmatch(revision):
        return revision
    ref = os.path.join(repo_folder(root, repo_id), "refs", *revision.split("/"))
    try:
        with open(ref, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError:
        return None
    return value if COMMIT_RE.fullmatch(value) else None


def complete_file(root: str, repo_id: str, *, commit: str, filename: str, size: int | None = None) -> str | None:
    """The snapshot path of a whole cached file, or None (absent, dangling link, or not ``size`` bytes)."""
    path = snapshot_path(root, repo_id, commit=commit, filename=filename)
    try:
        actual = os.path.getsize(path)  # follows the link: a dangling one raises
    except OSError:
        return None
    if size is not None and actual != size:
        return None
    return path


def blob_sha256(path: str) -> str | None:
    """The sha256 a cached snapshot file is stored under (its blob's name), if the blob is named by one."""
    name = os.path.basename(os.path.realpath(path))
    return name if re.fullmatch(r"[0-9a-f]{64}", name) else None


@dataclass(frozen=True, slots=True)
class RangeManifest:
    """Which byte ranges of ``file`` (``size`` bytes, ``sha256``) are present in its ``.part`` file."""

    file: str
    size: int
    sha256: str | None
    ranges: tuple[tuple[int, int], ...]

    def missing(self, needed: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> list[tuple[int, int]]:
        return subtract_ranges(needed, self.ranges)


def range_paths(root: str, repo_id: str, *, commit: str, filename: str) -> tuple[str, str]:
    """``(data, manifest)`` paths of a partially fetched file."""
    check_repo_filename(filename, where=repo_id)
    base = os.path.join(repo_folder(root, repo_id), RANGES_DIR, commit, *filename.split("/"))
    return base + ".part", base + ".json"


def lock_path(root: str, repo_id: str, *, commit: str, filename: str, sha256: str | None) -> str:
    """The lock every meshload writer of this file's cache entries holds (in the cache's ``.locks``)."""
    import hashlib

    key = sha256 or hashlib.sha1(f"{commit}/{filename}".encode()).hexdigest()
    return os.path.join(root, ".locks", os.path.basename(repo_folder(root, repo_id)), f"meshload-{key}.lock")


def record_ranges(
    root: str, repo_id: str, *, commit: str, filename: str, size: int, sha256: str | None, start: int, data: bytes,
    lock_timeout_s: float = 60.0,
) -> None:
    """Add ``data`` at ``start`` to the file's part and manifest (used to keep headers read while planning)."""
    from filelock import FileLock

    part, manifest_path = range_paths(root, repo_id, commit=commit, filename=filename)
    lock = lock_path(root, repo_id, commit=commit, filename=filename, sha256=sha256)
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    os.makedirs(os.path.dirname(part), exist_ok=True)
    with FileLock(lock, timeout=lock_timeout_s):
        present = read_manifest(manifest_path, file=filename, size=size, sha256=sha256)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            view, offset = memoryview(data), start
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            os.fsync(fd)
        finally:
            os.close(fd)
        ranges = (present.ranges if present else ()) + ((start, start + len(data)),)
        write_manifest(manifest_path, RangeManifest(filename, size, sha256, tuple(merge_ranges(list(ranges)))))


def read_manifest(path: str, *, file: str, size: int, sha256: str | None) -> RangeManifest | None:
    """The manifest at ``path`` if it exists and describes this very file (same size and sha256), else None."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    if data.get("file") != file or data.get("size") != size:
        return None
    if sha256 is not None and data.get("sha256") not in (None, sha256):
        return None
    try:
        ranges = tuple((int(a), int(b)) for a, b in data.get("ranges", []))
    except (TypeError, ValueError):
        return None
    if any(not 0 <= a < b <= size for a, b in ranges):
        return None
    return RangeManifest(file=file, size=size, sha256=data.get("sha256"), ranges=tuple(merge_ranges(list(ranges))))


def write_manifest(path: str, manifest: RangeManifest) -> None:
    """Replace the manifest atomically (temp file + fsync + rename). Call only after the data is fsync'ed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    body = {
        "format": MANIFEST_FORMAT,
        "file": manifest.file,
        "size": manifest.size,
        "sha256": manifest.sha256,
        "ranges": [list(r) for r in merge_ranges(list(manifest.ranges))],
    }
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def merge_ranges(ranges: list[tuple[int, int]], *, gap: int = 0) -> list[tuple[int, int]]:
    """Sorted union of half-open ranges; ranges closer than ``gap`` bytes are joined (the gap included)."""
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def subtract_ranges(needed, present) -> list[tuple[int, int]]:
    """The parts of ``needed`` not covered by ``present`` (both lists of half-open ranges)."""
    have = merge_ranges(list(present))
    out = []
    for a, b in merge_ranges(list(needed)):
        pos = a
        for c, d in have:
            if d <= pos or c >= b:
                continue
            if c > pos:
                out.append((pos, c))
            pos = max(pos, d)
            if pos >= b:
                break
        if pos < b:
            out.append((pos, b))
    return out
