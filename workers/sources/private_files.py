"""Files of meshload's own in a shared cache: private, symlink-proof, replaced atomically.

A node's cache may be shared with other users (a team's ``HF_HOME``), so everything meshload writes
there (part files, manifests, stamps, locks) is created 0700/0600, opened with ``O_NOFOLLOW`` (a symlink
planted in the cache is refused, never followed), replaced by an atomic rename after an fsync, and
refused when it belongs to another user or is writable by others.

Used by the part-file store (``workers.sources.part_store``) and the cache layout
(``workers.sources.hub_cache``), on the driver and on every node. No network.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import uuid

from planning.errors import CheckpointError


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
