"""The confinement rule: which files a plan may name, and what its names and hashes may look like.

A plan is data that can come from elsewhere — a JSON file, the plan cache (a folder other users may
write), a Hub endpoint's answers — and the names in it end up in paths that ranks open and that node
fetchers create, rewrite and delete. So every name is checked here, with one rule for the whole code:

- a commit (``revision`` of a Hub plan, ``refs/*`` contents) is 40 lowercase hex digits; a sha256
  (Hub LFS metadata, blob names) is 64; a git blob sha1 (non-LFS Hub files) is 40;
- a repo id is what ``huggingface_hub`` accepts (``org/name``: no ``..``, no ``--``, no slashes beyond
  the one), so ``models--org--name`` is one folder of the cache;
- a checkpoint file name is a plain relative path (no absolute path, no ``.``/``..`` component, no
  backslash) that, with every symlink resolved, stays inside the checkpoint folder — except in a
  Hugging Face cache snapshot (``<cache>/models--org--name/snapshots/<commit>``, what
  ``snapshot_download`` returns), where a file may also resolve to a blob (a file named by its hash)
  directly inside the *same* repo's ``blobs/`` folder. Nothing else is followed.

Path resolution reads the file system (``realpath``); everything else is pure. Used on the driver
(resolve, plan checks) and on every node (fetchers, ranks).
"""

from __future__ import annotations

import os
import re

from planning.errors import CheckpointError

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
BLOB_NAME_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # git sha1 (small files) or sha256 (LFS)
REPO_FOLDER_PREFIX = "models--"


def check_commit(value: object, *, where: str) -> str:
    """``value`` if it is a commit sha (40 lowercase hex digits), else a ``CheckpointError`` naming ``where``."""
    if not isinstance(value, str) or not COMMIT_RE.fullmatch(value):
        raise CheckpointError(f"{where}: revision {value!r} is not a commit sha (40 hex digits)")
    return value


def check_sha256(value: object, *, where: str) -> str | None:
    """``value`` if it is None or a sha256 (64 lowercase hex digits), else a ``CheckpointError``."""
    if value is not None and (not isinstance(value, str) or not SHA256_RE.fullmatch(value)):
        raise CheckpointError(f"{where}: sha256 {value!r} is not 64 hex digits")
    return value


def check_git_sha1(value: object, *, where: str) -> str | None:
    """``value`` if it is None or a git blob id (40 lowercase hex digits), else a ``CheckpointError``."""
    if value is not None and (not isinstance(value, str) or not COMMIT_RE.fullmatch(value)):
        raise CheckpointError(f"{where}: git blob id {value!r} is not 40 hex digits")
    return value


def check_repo_id(value: object, *, where: str) -> str:
    """``value`` if huggingface_hub accepts it as a repo id, else a ``CheckpointError``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(value, str):
        raise CheckpointError(f"{where}: repo id {value!r} is not a string")
    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise CheckpointError(f"{where}: {value!r} is not a valid Hub repo id ({str(exc).splitlines()[0]})") from None
    return value


def check_relative_name(name: object, *, where: str) -> str:
    """A plain relative file name: not empty or absolute, no ``.``/``..`` component, no backslash."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: file name {name!r} is not a plain relative path")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise CheckpointError(f"{where}: file name {name!r} is absolute; checkpoint files must be inside the checkpoint folder")
    if "\\" in name or "\0" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise CheckpointError(f"{where}: file name {name!r} escapes the checkpoint folder (not a plain relative path)")
    return name


def snapshot_blobs(folder: str) -> str | None:
    """The real path of the repo's ``blobs/`` folder when ``folder`` (a real path) is a Hugging Face cache
    snapshot, ``<cache>/models--org--name/snapshots/<commit>``; else None."""
    snapshots, commit = os.path.split(folder)
    repo, name = os.path.split(snapshots)
    if name != "snapshots" or not COMMIT_RE.fullmatch(commit) or not os.path.basename(repo).startswith(REPO_FOLDER_PREFIX):
        return None
    return os.path.realpath(os.path.join(repo, "blobs"))


def confined_path(root: str, relative: str, *, what: str) -> str:
    """The real path of ``relative`` under ``root``, if the confinement rule (module docstring) allows it.

    Anything else — an absolute name, ``..``, a symlink anywhere outside the folder, a snapshot link
    into another repo's blobs or to a file not named by a hash — is a ``CheckpointError`` naming it.
    """
    if isinstance(relative, str) and (os.path.isabs(relative) or relative.startswith(("/", "\\"))):
        raise CheckpointError(f"{what}: file name {relative!r} is absolute; checkpoint files must be inside {root}")
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise CheckpointError(f"{what}: file name {relative!r} is not a plain relative path")
    real_root = os.path.realpath(root)
    joined = os.path.realpath(os.path.join(real_root, relative))
    if os.path.commonpath([real_root, joined]) == real_root:
        return joined
    blobs = snapshot_blobs(real_root)
    if blobs is not None and not any(p in (".", "..") for p in relative.split("/")):
        if os.path.dirname(joined) == blobs and BLOB_NAME_RE.fullmatch(os.path.basename(joined)):
            return joined
        raise CheckpointError(
            f"{what}: file name {relative!r} escapes the checkpoint folder {root} (it resolves to {joined}; in a "
            f"Hugging Face cache snapshot only links to blobs of the same repo, {blobs}, are followed)"
        )
    raise CheckpointError(f"{what}: file name {relative!r} escapes the checkpoint folder {root}")
