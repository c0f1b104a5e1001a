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
    <cache>/models--org--name/meshload-ranges/<commit>/<file>.json   manifest: size, hashes, pieces present

The manifest is replaced atomically and only after the bytes it lists are on disk (fsync), so a crash
leaves a manifest that under-reports: those ranges are fetched again, never read as garbage. It records
each piece as fetched with the sha256 of its bytes; a later fetch re-hashes the pieces it reuses, and a
piece that no longer matches is dropped and fetched again.

A whole file is hashed against the Hub's checksum when fetched; that it was is recorded, with the
file's device, inode, size, mtime and ctime, in ``meshload-verified/<blob>.json``, so a later load
re-hashes it only if it changed (a blob is not trusted for its name).

meshload's own folders and files are created private (0700/0600), opened with ``O_NOFOLLOW`` (a
symlink planted in a shared cache is refused, never followed), replaced by atomic renames, and refused
when they belong to another user or are writable by others. Snapshot entries are followed only into
the same repo's ``blobs/`` (``planning.confinement``).

Which cache folder: the ``cache_dir`` option, else ``MESHLOAD_CACHE_DIR``, else huggingface_hub's own
default (``HF_HUB_CACHE``/``HF_HOME``) — each read where this code runs (the driver for planning, each
node for fetching), so nodes without a shared disk each use their own.

Writers of a file's entries (node fetchers, and planning, which keeps the headers it read) hold one
file lock per file, in ``models--org--name/meshload-locks/`` (private, like the rest of meshload's).

Path, lock and manifest helpers; no network. Used on the driver (planning, offline planning) and on
every node (``workers.fetcher``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import uuid
from dataclasses import dataclass

from planning.confinement import COMMIT_RE, SHA256_RE, check_commit, check_relative_name, confined_path
from planning.errors import CheckpointError

CACHE_ENV = "MESHLOAD_CACHE_DIR"
RANGES_DIR = "meshload-ranges"
STAMPS_DIR = "meshload-verified"
LOCKS_DIR = "meshload-locks"
MANIFEST_FORMAT = "meshload-ranges/2"
HASH_CHUNK = 8 << 20


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
    return check_relative_name(name, where=where)


def snapshot_dir(root: str, repo_id: str, *, commit: str) -> str:
    check_commit(commit, where=repo_id)
    return os.path.join(repo_folder(root, repo_id), "snapshots", commit)


def snapshot_path(root: str, repo_id: str, *, commit: str, filename: str) -> str:
    check_repo_filename(filename, where=repo_id)
    return os.path.join(snapshot_dir(root, repo_id, commit=commit), *filename.split("/"))


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
    """The snapshot path of a whole cached file, or None (absent, dangling link, not ``size`` bytes, or a
    link that does not resolve into the repo's own ``blobs/``: ``planning.confinement``)."""
    path = snapshot_path(root, repo_id, commit=commit, filename=filename)
    if not os.path.lexists(path):
        return None
    confined_path(snapshot_dir(root, repo_id, commit=commit), filename, what=f"{repo_id}@{commit[:12]}")
    try:
        actual = os.path.getsize(path)  # follows the link: a dangling one raises
    except OSError:
        return None
    if size is not None and actual != size:
        return None
    return path


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


def range_paths(root: str, repo_id: str, *, commit: str, filename: str) -> tuple[str, str]:
    """``(data, manifest)`` paths of a partially fetched file."""
    check_repo_filename(filename, where=repo_id)
    check_commit(commit, where=repo_id)
    base = os.path.join(repo_folder(root, repo_id), RANGES_DIR, commit, *filename.split("/"))
    return base + ".part", base + ".json"


def lock_path(root: str, repo_id: str, *, commit: str, filename: str, sha256: str | None) -> str:
    """The lock every meshload writer of this file's cache entries holds (in meshload's private lock folder)."""
    key = sha256 or hashlib.sha1(f"{commit}/{filename}".encode()).hexdigest()
    return os.path.join(repo_folder(root, repo_id), LOCKS_DIR, f"{key}.lock")


def file_lock(root: str, repo_id: str, *, commit: str, filename: str, sha256: str | None, timeout: float):
    """A ``filelock.FileLock`` on ``lock_path`` (its folder made private first: no planted lock file)."""
    from filelock import FileLock

    path = lock_path(root, repo_id, commit=commit, filename=filename, sha256=sha256)
    private_dirs(repo_folder(root, repo_id), os.path.dirname(path))
    return FileLock(path, timeout=timeout, mode=0o600)


# -- private, symlink-proof writes ------------------------------------------------------------------

def private_dirs(base: str, folder: str) -> str:
    """Create ``folder``, a folder of meshload's below ``base`` (a repo's cache folder, huggingface_hub's,
    made if missing), with every missing level mode 0700; refuse any level below ``base`` that is a
    symlink, belongs to another user or is writable by others, so that nothing can be planted where
    meshload writes. Returns ``folder``."""
    rel = os.path.relpath(folder, base)
    if rel == "." or rel.startswith(".."):
        raise CheckpointError(f"{folder} is not a folder below {base}")
    os.makedirs(base, exist_ok=True)
    path = base
    for part in rel.split(os.sep):
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"refusing to write into {path}: it is not a folder (a symlink?)")
        _check_owned(path, st)
    return folder


def _check_owned(path: str, st: os.stat_result) -> None:
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise CheckpointError(
            f"refusing to write into {path}: it belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o} "
            f"(meshload writes only into its own folders, not writable by others)"
        )


def open_private(path: str, flags: int) -> int:
    """``os.open(path, flags | O_CREAT | O_NOFOLLOW, 0o600)`` of a file of ours: a symlink planted at ``path``
    is refused (never followed), as is a file of another user; a looser mode is made 0600."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"refusing to write {path}: it is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise CheckpointError(f"refusing to write {path}: not a regular file of this user (uid {st.st_uid})")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: a new private file (exclusive, no symlink followed), fsync'ed, renamed over."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def read_private_json(path: str):
    """The JSON in a file of this user's at ``path`` (not through a symlink), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_uid != os.getuid():
                return None
            return json.load(f)
    except (OSError, ValueError):
        return None


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


def record_ranges(
    root: str, repo_id: str, *, commit: str, filename: str, size: int, sha256: str | None, start: int, data: bytes,
    git_sha1: str | None = None, lock_timeout_s: float = 60.0,
) -> None:
    """Add ``data`` at ``start`` to the file's part and manifest (used to keep headers read while planning)."""
    part, manifest_path = range_paths(root, repo_id, commit=commit, filename=filename)
    with file_lock(root, repo_id, commit=commit, filename=filename, sha256=sha256, timeout=lock_timeout_s):
        present = read_manifest(manifest_path, file=filename, size=size, sha256=sha256, git_sha1=git_sha1)
        fd = open_part(repo_folder(root, repo_id), part, size)
        try:
            view, offset = memoryview(data), start
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            os.fsync(fd)
        finally:
            os.close(fd)
        manifest = present or RangeManifest(filename, size, sha256, (), git_sha1)
        write_manifest(manifest_path, manifest.adding(start, start + len(data), hashlib.sha256(data).hexdigest()))


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


# -- whole files: verified once, then known by their state -------------------------------------------

def stamp_path(root: str, repo_id: str, blob: str) -> str:
    return os.path.join(repo_folder(root, repo_id), STAMPS_DIR, os.path.basename(blob) + ".json")


def _state(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def stamped(root: str, repo_id: str, path: str, *, checksum: str) -> bool:
    """Whether the file at ``path`` (a snapshot entry) was hashed to ``checksum`` by meshload and has not
    changed since: same device, inode, size, mtime and ctime (a user cannot set ctime back)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return False
    data = read_private_json(stamp_path(root, repo_id, real))
    return isinstance(data, dict) and data.get("checksum") == checksum and data.get("state") == _state(st)


def stamp(root: str, repo_id: str, path: str, *, checksum: str, state: os.stat_result) -> None:
    """Record that the file at ``path``, as it was in ``state`` (its ``fstat`` when hashing began), hashed to ``checksum``."""
    real = os.path.realpath(path)
    target = stamp_path(root, repo_id, real)
    private_dirs(repo_folder(root, repo_id), os.path.dirname(target))
    write_private_atomically(target, json.dumps({"checksum": checksum, "state": _state(state)}).encode())


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
