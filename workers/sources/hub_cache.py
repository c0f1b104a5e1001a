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

The pair is the part-file store's format (``workers.sources.part_store``: a manifest replaced only after
the bytes it lists are fsync'ed, each piece with the sha256 of its bytes, re-hashed when reused).

A whole file is hashed against the Hub's checksum when fetched; that it was is recorded, with the
file's device, inode, size, mtime and ctime, in ``meshload-verified/<blob>.json``, so a later load
re-hashes it only if it changed (a blob is not trusted for its name).

meshload's own folders and files are created private (0700/0600), opened with ``O_NOFOLLOW`` (a
symlink planted in a shared cache is refused, never followed), replaced by atomic renames, and refused
when they belong to another user or are writable by others (``workers.sources.private_files``). Snapshot entries are followed only into
the same repo's ``blobs/`` (``planning.confinement``).

Which cache folder: the ``cache_dir`` option, else ``MESHLOAD_CACHE_DIR``, else huggingface_hub's own
default (``HF_HUB_CACHE``/``HF_HOME``) — each read where this code runs (the driver for planning, each
node for fetching), so nodes without a shared disk each use their own.

Writers of a file's entries (node fetchers, and the Hub source's resolve, which keeps the headers it read) hold one
file lock per file, in ``models--org--name/meshload-locks/`` (private, like the rest of meshload's).

Paths, refs, locks and stamps; no network. Used on the driver (resolving, also offline) and on
every node (``workers.sources.hub_fetcher``).
"""

from __future__ import annotations

import hashlib
import json
import os

from planning.confinement import COMMIT_RE, check_commit, check_relative_name, confined_path
from workers.sources.part_store import PartFile, RangeManifest, read_manifest
from workers.sources.private_files import private_dirs, read_private_json, write_private_atomically

CACHE_ENV = "MESHLOAD_CACHE_DIR"
RANGES_DIR = "meshload-ranges"
STAMPS_DIR = "meshload-verified"
LOCKS_DIR = "meshload-locks"


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


def record_ranges(
    root: str, repo_id: str, *, commit: str, filename: str, size: int, sha256: str | None, start: int, data: bytes,
    git_sha1: str | None = None, lock_timeout_s: float = 60.0,
) -> None:
    """Add ``data`` at ``start`` to the file's part and manifest (used to keep headers read while planning)."""
    part, manifest_path = range_paths(root, repo_id, commit=commit, filename=filename)
    with file_lock(root, repo_id, commit=commit, filename=filename, sha256=sha256, timeout=lock_timeout_s):
        present = read_manifest(manifest_path, file=filename, size=size, sha256=sha256, git_sha1=git_sha1)
        store = PartFile(repo_folder(root, repo_id), part, manifest_path, present or RangeManifest(filename, size, sha256, (), git_sha1))
        try:
            store.write(start, data)
            store.done(start, start + len(data), hashlib.sha256(data).hexdigest())
        finally:
            store.close()  # the bytes fsync'ed, then the manifest that vouches for them


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
