"""What the Hub source (``workers.sources.hub``, on the driver) and its node fetchers
(``workers.sources.hub_fetcher``, ``hub_whole``, ``hub_ranges``, on each node) share: the endpoint and the
offline mode, read when asked, and Hub errors turned into ``CheckpointError``s naming repo, revision and file.
Its own module so that the source can name its fetcher and the fetchers these helpers without a cycle.
"""

from __future__ import annotations

import os

from planning.errors import CheckpointError
from workers.sources.http import http_status, httpx


def hub_endpoint() -> str:
    """The Hub endpoint, read now: ``$HF_ENDPOINT`` if set, else huggingface_hub's configured one."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """Offline mode, read now (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``, or huggingface_hub's own flag)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.is_offline_mode() or any((v or "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in flags)


def describe_hub_error(exc: BaseException, *, repo_id: str, revision: str | None, what: str) -> CheckpointError:
    """A ``CheckpointError`` naming the repo, revision and file for an error of huggingface_hub or the network."""
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, GatedRepoError):
        return CheckpointError(f"{repo_id}: gated repo; accept its conditions on the Hub and pass token=... ({what})")
    if isinstance(exc, RepositoryNotFoundError):
        return CheckpointError(
            f"{repo_id}: no such repo at {hub_endpoint()} (or it is private and no valid token was given) ({what})"
        )
    if isinstance(exc, RevisionNotFoundError):
        return CheckpointError(f"{repo_id}: revision {rev!r} not found ({what})")
    if isinstance(exc, RemoteEntryNotFoundError):
        return CheckpointError(f"{repo_id}@{rev}: {what}: no such file in the repo")
    if isinstance(exc, OfflineModeIsEnabled):
        return CheckpointError(f"{repo_id}@{rev}: {what}: offline mode is on (HF_HUB_OFFLINE) and it is not cached")
    status = http_status(exc)
    if status is not None:
        return CheckpointError(f"{repo_id}@{rev}: {what}: HTTP {status} from the Hub ({first_line})")
    if isinstance(exc, httpx.TransportError):
        return CheckpointError(
            f"{repo_id}@{rev}: {what}: cannot reach the Hub at {hub_endpoint()} ({type(exc).__name__}: {first_line}); "
            f"set HF_HUB_OFFLINE=1 to plan from the local cache"
        )
    return CheckpointError(f"{repo_id}@{rev}: {what}: {type(exc).__name__}: {first_line}")
