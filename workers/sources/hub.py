"""The Hub source: index a Hub checkpoint from its safetensors headers, fetched with HTTP range requests.

Planning a load of ``org/name`` must not download the shards: it needs each file's header (a few
kilobytes: every tensor's dtype, shape and byte range), ``config.json``, the sharded index, and — for
the fetch stage — every file's size and sha256. This module gets exactly that:

1. the revision → commit sha (``HfApi.resolve_revision``, which also records it under ``refs/``);
2. one listing of the repo root at that commit (``HfApi.list_repo_tree``; ``get_paths_info`` for shards
   in sub-folders): the checkpoint layout, each file's size and its LFS sha256;
3. ``config.json`` and ``model.safetensors.index.json`` with ``hf_hub_download`` (small, and cached in
   the standard layout so that other tools and offline planning reuse them);
4. per safetensors file two range requests — ``bytes=0-7`` then exactly the JSON header — validated by
   ``planning.safetensors_header``. Not one byte of tensor data is requested. The header bytes are kept
   in the cache's range store (``workers.sources.hub_cache``: a sparse part holding just the header), so a
   later plan (online or offline), or a range fetch on this machine, does not ask for them again: a
   commit's header found intact in this machine's cache (a whole file meshload hashed and that has not
   changed since, or a part whose header pieces still hash as recorded) is used as it is.

Every file is addressed by the resolved commit, so the plan, and every node's fetch, read the same
version even if the branch moves meanwhile.

Offline (``HF_HUB_OFFLINE=1``): the same index is built from the local cache — the ref → commit, the
snapshot's config and index, each file's header from the cached file or from a range-fetched partial
copy (which always holds its header). Everything missing is named in one ``CheckpointError``.

Runs on the driver (``orchestrator.plan``/``load``, ``meshload plan``). No Ray, no tensor data. ``HubRepo``
(end of file) is this source's entry in ``workers.sources.SOURCES``; its node fetcher is
``workers.sources.hub_fetcher.NodeFetcher``.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from planning.checkpoint import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, choose_layout, index_from_headers
from planning.confinement import COMMIT_RE, REPO_FOLDER_PREFIX, check_commit, check_git_sha1, check_relative_name, check_repo_id, check_sha256
from planning.errors import CheckpointError, ConfigError
from planning.planner import ResolvedModel
from planning.safetensors_header import SafetensorsHeader, header_digest, header_length, parse_header, read_header
from workers.sources import hub_cache, part_store
from workers.sources.base import CheckpointSource, looks_like_path
from workers.sources.hub_common import describe_hub_error, hub_endpoint, hub_offline
from workers.sources.private_files import read_private_json
from workers.sources.http import RangeIgnored, RetryPolicy, Target, ranged_get, transient_error, unreachable

if TYPE_CHECKING:
    from planning.plan import LoadPlan

log = logging.getLogger("meshload")

HEADER_FETCH_WORKERS = 8
HEADER_RETRY = RetryPolicy(attempts=4)  # listing, config, index and header reads on the driver
ONE_TRY = RetryPolicy(attempts=1)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _retrying(fn, *, repo_id: str, revision: str, what: str):
    """``fn()`` under the header reads' ``RetryPolicy`` (transient errors; not a Hub that cannot be reached at
    all: huggingface_hub has retried that already); anything else, or the last failure, as a ``CheckpointError``."""
    try:
        return HEADER_RETRY.call(fn, retry_if=lambda exc: transient_error(exc) and not unreachable(exc))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated
        raise describe_hub_error(exc, repo_id=repo_id, revision=revision, what=what) from exc


# -- range requests ------------------------------------------------------------------------------

def read_range(url: str, *, start: int, stop: int, file: str, size: int, headers: dict[str, str], timeout: float) -> bytes:
    """Bytes ``[start, stop)`` of the file at ``url`` (``workers.sources.http.ranged_get``, one try: the caller
    retries). A server that ignores the range (HTTP 200) is refused, not read: that would be the whole shard;
    the total size in ``Content-Range`` must be ``size`` (the repo listing's), or the file changed."""
    buf = bytearray(stop - start)

    def write(offset: int, chunk: bytes) -> None:
        buf[offset - start : offset - start + len(chunk)] = chunk

    try:
        ranged_get(lambda refresh: Target(url, headers), start=start, stop=stop, size=size, file=file, write=write,
                   timeout_s=timeout, policy=ONE_TRY)
    except RangeIgnored:
        raise CheckpointError(
            f"{file}: the server answered HTTP 200 to a range request for bytes {start}-{stop - 1} of {url}; "
            f"byte ranges are required to read headers without downloading the shard"
        ) from None
    return bytes(buf)


def fetch_header(url: str, *, file: str, size: int, headers: dict[str, str], timeout: float) -> tuple[SafetensorsHeader, bytes]:
    """A safetensors header over HTTP — the 8-byte length, then exactly the JSON — validated; and its raw bytes."""
    prefix = read_range(url, start=0, stop=8, file=file, size=size, headers=headers, timeout=timeout) if size >= 8 else b""
    n = header_length(prefix, file=file, file_size=size)
    body = read_range(url, start=8, stop=8 + n, file=file, size=size, headers=headers, timeout=timeout) if n else b""
    return parse_header(body, file=file, file_size=size), prefix + body


# -- layout ----------------------------------------------------------------------------------------

def hub_layout(names: set[str], *, where: str) -> tuple[str, str]:
    """``("index", name)`` or ``("single", name)`` from the file names at the repo root
    (``planning.checkpoint.choose_layout``); a repo whose weights are pickles only is refused."""
    try:
        kind, entry = choose_layout(names, where=where)
    except CheckpointError:
        kind, entry = None, None
    if kind is not None and not kind.startswith("pickle"):
        return ("index" if kind == "safetensors-index" else "single"), entry
    singles = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    pickles = sorted(n for n in names if n in (PICKLE_INDEX, PICKLE_SINGLE) or n.endswith(PICKLE_SUFFIXES))
    if pickles and not singles:
        entry = PICKLE_INDEX if PICKLE_INDEX in pickles else pickles[0]
        raise CheckpointError(
            f"{where}/{entry} is a pickle checkpoint; loading it can run arbitrary code, so meshload refuses it "
            f"(Hub checkpoints are fetched and read as safetensors only, and this repo has no .safetensors weights). "
            f"Prefer converting it to safetensors."
        )
    raise CheckpointError(
        f"{where}: no {SAFE_INDEX}, {SAFE_SINGLE} or {PICKLE_SINGLE} found "
        f"(found {len(singles)} .safetensors files without an index; files: {sorted(names)[:20]})"
    )


def _load_json(path: str, *, what: str, error: type[Exception]) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise error(f"{what}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def weight_map_of(data: dict, *, what: str) -> dict[str, str]:
    """The sharded index's ``weight_map`` (tensor name → file name), its file names checked (no path escapes)."""
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{what}: expected an object with a 'weight_map' of tensor name → file name")
    for fname in set(weight_map.values()):
        hub_cache.check_repo_filename(fname, where=what)
    return weight_map


# -- online ----------------------------------------------------------------------------------------

def resolve_hub_model(
    repo_id: str, *, revision: str | None = None, cache_dir: str | None = None, token: str | bool | None = None
) -> ResolvedModel:
    """Locate and index Hub repo ``repo_id`` at ``revision`` (see module docstring); headers only.

    When the Hub cannot be reached at all (no connection, not an HTTP error) and the local cache holds
    the repo at that revision, it is planned from the cache, as offline mode would, with a warning —
    as ``transformers`` falls back to its cache.
    """
    check_repo_id(repo_id, where=repo_id)
    if revision is not None and not COMMIT_RE.fullmatch(revision):
        check_relative_name(revision, where=f"{repo_id}: revision")  # a branch or tag: a path under refs/
    root = hub_cache.cache_root(cache_dir)
    if hub_offline():
        return _resolve_offline(repo_id, revision=revision, root=root)
    try:
        return _resolve_online(repo_id, revision=revision, root=root, token=token)
    except CheckpointError as exc:
        if not unreachable(exc):
            raise
        try:
            resolved = _resolve_offline(repo_id, revision=revision, root=root)
        except CheckpointError:
            raise exc from exc.__cause__
        log.warning("meshload: the Hub at %s cannot be reached (%s); %s@%s planned from the local cache %s",
                    hub_endpoint(), exc, repo_id, resolved.revision[:12], root)
        return resolved


def _resolve_online(repo_id: str, *, revision: str | None, root: str, token) -> ResolvedModel:
    from huggingface_hub import HfApi, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers
    from huggingface_hub.hf_api import RepoFile

    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    rev = revision or "main"
    commit = _retrying(
        lambda: api.resolve_revision(repo_id, revision=revision, cache_dir=root, token=token).resolved,
        repo_id=repo_id, revision=rev, what="resolving the revision",
    )
    check_commit(commit, where=f"{repo_id}@{rev}: the Hub at {endpoint} answered a commit that")
    where = f"{repo_id}@{commit[:12]}"
    listing = {
        e.path: e
        for e in _retrying(
            lambda: list(api.list_repo_tree(repo_id, revision=commit, token=token)),
            repo_id=repo_id, revision=commit, what="listing the repo",
        )
        if isinstance(e, RepoFile)
    }
    kind, entry = hub_layout(set(listing), where=where)

    def download(name: str) -> str:
        return _retrying(
            lambda: hf_hub_download(repo_id, name, revision=commit, cache_dir=root, token=token, endpoint=endpoint),
            repo_id=repo_id, revision=commit, what=name,
        )

    if "config.json" not in listing:
        raise ConfigError(f"{where}: no config.json in the repo")
    config_dict = _load_json(download("config.json"), what=f"{where}/config.json", error=ConfigError)
    weight_map = None
    if kind == "index":
        weight_map = weight_map_of(_load_json(download(entry), what=f"{where}/{entry}", error=CheckpointError), what=f"{where}/{entry}")
        files = sorted(set(weight_map.values()))
    else:
        files = [entry]
    absent = [f for f in files if f not in listing]
    if absent:
        infos = _retrying(
            lambda: api.get_paths_info(repo_id, absent, revision=commit, token=token),
            repo_id=repo_id, revision=commit, what="looking up the shards",
        )
        listing.update({e.path: e for e in infos if isinstance(e, RepoFile)})
        still = [f for f in absent if f not in listing]
        if still:
            raise CheckpointError(f"{where}: {entry} references {len(still)} file(s) missing from the repo: {still}")

    from huggingface_hub import constants

    http_headers = build_hf_headers(token=token)
    timeout = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)

    sha256 = {f: listing[f].lfs.sha256 for f in files if listing[f].lfs is not None}
    for f, value in sha256.items():
        check_sha256(value, where=f"{where}/{f}: the Hub's listing at {endpoint}")
    git_sha1 = {f: listing[f].blob_id for f in files if listing[f].lfs is None and listing[f].blob_id}
    for f, value in git_sha1.items():  # a file kept in git, not LFS: its git blob id is its checksum
        check_git_sha1(value, where=f"{where}/{f}: the Hub's listing at {endpoint}")

    def header_of(name: str) -> tuple[SafetensorsHeader, bytes | None]:
        kept = _cached_header(root, repo_id, commit, name, size=listing[name].size, checksum=sha256.get(name) or git_sha1.get(name))
        if kept is not None:  # this commit's header, already in this machine's cache and still intact
            return kept, None
        url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
        header, raw = _retrying(
            lambda: fetch_header(url, file=name, size=listing[name].size, headers=http_headers, timeout=timeout),
            repo_id=repo_id, revision=commit, what=f"{name} (header)",
        )
        return replace(header, sha256=header_digest(raw)), raw

    with ThreadPoolExecutor(max_workers=min(HEADER_FETCH_WORKERS, len(files))) as pool:
        fetched = dict(zip(files, pool.map(header_of, files)))
    headers = {name: header for name, (header, _) in fetched.items()}
    for name, (header, raw) in fetched.items():
        if raw is not None:
            _keep_header(root, repo_id, commit, name, size=header.file_size, sha256=sha256.get(name),
                         git_sha1=git_sha1.get(name), raw=raw)
    index = index_from_headers(None, headers, weight_map=weight_map, sha256=sha256, git_sha1=git_sha1, index_name=entry)
    return ResolvedModel(ref_source=repo_id, kind="hub", root=None, revision=commit, config_dict=config_dict, index=index)


def _keep_header(
    root: str, repo_id: str, commit: str, name: str, *, size: int, sha256: str | None, git_sha1: str | None, raw: bytes
) -> None:
    """Keep a fetched header in the cache's range store: offline planning and range fetches reuse it.

    Best effort: a read-only or full cache only costs those later requests.
    """
    try:
        hub_cache.record_ranges(
            root, repo_id, commit=commit, filename=name, size=size, sha256=sha256, git_sha1=git_sha1, start=0, data=raw,
            lock_timeout_s=5.0
        )
    except Exception as exc:  # noqa: BLE001 - an optimisation; planning goes on
        log.warning("meshload: could not keep the header of %s in %s (%s)", name, root, exc)


# -- offline ---------------------------------------------------------------------------------------

def _cached_names(root: str, repo_id: str, commit: str) -> set[str]:
    """Files of ``commit`` present in the cache: whole (snapshot) or in part (range store)."""
    names = set()
    snap = os.path.join(hub_cache.repo_folder(root, repo_id), "snapshots", commit)
    ranges = os.path.join(hub_cache.repo_folder(root, repo_id), hub_cache.RANGES_DIR, commit)
    for base, suffix in ((snap, ""), (ranges, ".json")):
        for folder, _, entries in os.walk(base):
            for e in entries:
                if e.endswith(suffix):
                    rel = os.path.relpath(os.path.join(folder, e), base).replace(os.sep, "/")
                    names.add(rel[: len(rel) - len(suffix)] if suffix else rel)
    return names


def _partial_header(root: str, repo_id: str, commit: str, name: str, *, size: int | None = None,
                    sha256: str | None = None) -> tuple[SafetensorsHeader, part_store.RangeManifest] | None:
    """The header of a range-fetched file, if its manifest covers it and the pieces holding it still hash
    as recorded (``size``/``sha256``: also those the manifest must describe)."""
    data, manifest_path = hub_cache.range_paths(root, repo_id, commit=commit, filename=name)
    raw = read_private_json(manifest_path)
    if not isinstance(raw, dict):
        return None
    try:
        size, sha = (int(raw["size"]) if size is None else size), (raw.get("sha256") if sha256 is None else sha256)
    except (KeyError, TypeError, ValueError):
        return None
    manifest = part_store.read_manifest(manifest_path, file=name, size=size, sha256=sha)
    if manifest is None or manifest.missing([(0, min(8, size))]):
        return None
    try:
        fd = os.open(data, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        prefix = os.pread(fd, 8, 0)
        n = header_length(prefix, file=name, file_size=size)
        if manifest.missing([(0, 8 + n)]):
            return None
        if any(part_store.piece_digest(fd, a, b) != d for a, b, d in manifest.touching([(0, 8 + n)])):
            return None  # the part changed on disk: not a header to plan from
        body = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    header = parse_header(body, file=name, file_size=size)
    return replace(header, sha256=header_digest(prefix + body)), manifest


def _cached_header(root: str, repo_id: str, commit: str, name: str, *, size: int, checksum: str | None) -> SafetensorsHeader | None:
    """``name``'s header at ``commit`` from this machine's cache, if it is there and intact: a whole file
    that meshload hashed to ``checksum`` and has not changed since, or a part whose header pieces still hash
    as recorded. Else None (then it is fetched)."""
    try:
        path = hub_cache.complete_file(root, repo_id, commit=commit, filename=name, size=size)
        if path is not None and checksum is not None and hub_cache.stamped(root, repo_id, path, checksum=checksum):
            return read_header(path, display_name=name)
        partial = _partial_header(root, repo_id, commit, name, size=size, sha256=checksum if checksum and len(checksum) == 64 else None)
    except (CheckpointError, OSError):
        return None
    return partial[0] if partial is not None else None


def _resolve_offline(repo_id: str, *, revision: str | None, root: str) -> ResolvedModel:
    rev = revision or "main"
    commit = hub_cache.ref_commit(root, repo_id, revision=rev)
    if commit is None:
        raise CheckpointError(
            f"{repo_id}: offline mode (HF_HUB_OFFLINE=1) and revision {rev!r} is not in the local cache {root} "
            f"(no refs/{rev}); resolve it once online, or pass revision=<commit sha> of a cached snapshot"
        )
    where = f"{repo_id}@{commit[:12]}"
    names = _cached_names(root, repo_id, commit)
    missing: list[str] = []
    config_path = hub_cache.complete_file(root, repo_id, commit=commit, filename="config.json")
    if config_path is None:
        missing.append("config.json")
    try:
        kind, entry = hub_layout(names, where=where)
    except CheckpointError as exc:
        if "pickle" in str(exc):
            raise
        kind, entry = None, None
        missing.append(f"{SAFE_INDEX} or {SAFE_SINGLE}")
    weight_map, files = None, []
    if kind == "index":
        index_path = hub_cache.complete_file(root, repo_id, commit=commit, filename=entry)
        if index_path is None:
            missing.append(entry)
        else:
            weight_map = weight_map_of(_load_json(index_path, what=f"{where}/{entry}", error=CheckpointError), what=f"{where}/{entry}")
            files = sorted(set(weight_map.values()))
    elif kind == "single":
        files = [entry]
    headers, sha256, git_sha1 = {}, {}, {}
    for name in files:
        path = hub_cache.complete_file(root, repo_id, commit=commit, filename=name)
        if path is not None:  # huggingface_hub names a blob by its sha256 (LFS) or git blob id: what the Hub listed
            headers[name] = read_header(path, display_name=name)
            blob = os.path.basename(os.path.realpath(path))
            (sha256 if len(blob) == 64 else git_sha1)[name] = blob
            continue
        partial = _partial_header(root, repo_id, commit, name)
        if partial is None:
            missing.append(f"{name} (not even its header)")
            continue
        headers[name], manifest = partial
        if manifest.sha256 is not None:
            sha256[name] = manifest.sha256
        if manifest.git_sha1 is not None:
            git_sha1[name] = manifest.git_sha1
    if missing:
        raise CheckpointError(
            f"{where}: offline mode (HF_HUB_OFFLINE=1) and the local cache {root} lacks {len(missing)} item(s): "
            f"{', '.join(missing)}. Run once online (meshload plan/load without HF_HUB_OFFLINE) or copy the cache."
        )
    config_dict = _load_json(config_path, what=f"{where}/config.json", error=ConfigError)
    index = index_from_headers(None, headers, weight_map=weight_map, sha256=sha256, git_sha1=git_sha1, index_name=entry)
    return ResolvedModel(ref_source=repo_id, kind="hub", root=None, revision=commit, config_dict=config_dict, index=index)


# -- the source ------------------------------------------------------------------------------------

class HubRepo(CheckpointSource):
    """A Hugging Face Hub repo id (``org/name``, ``revision=``): resolved by range requests on the driver
    (above), fetched by each node into its own cache (``workers.sources.hub_fetcher.NodeFetcher``)."""

    kind = "hub"
    remote = True

    def claims(self, model: str) -> bool:
        return not looks_like_path(model) and "://" not in model and model.count("/") <= 1

    def resolve(
        self, model: str, *, revision: str | None = None, cache_dir: str | None = None, token: str | bool | None = None,
        allow_pickle: bool = False,
    ) -> ResolvedModel:
        return resolve_hub_model(model, revision=revision, cache_dir=cache_dir, token=token)

    def resolve_plan(
        self, plan: LoadPlan, *, cache_dir: str | None = None, token: str | bool | None = None, allow_pickle: bool = False
    ) -> ResolvedModel:
        """At the plan's commit."""
        return resolve_hub_model(plan.model.source, revision=plan.model.revision, cache_dir=cache_dir, token=token)

    def confine(self, plan: LoadPlan, name: str, path: str, *, where: str) -> str:
        """In this node's cache: a blob of the repo (or a file copied into its snapshot where symlinks are not
        available), or a part file of meshload's range store for the plan's commit."""
        m = plan.model
        real = os.path.realpath(path)
        repo = REPO_FOLDER_PREFIX + m.source.replace("/", "--")
        parts = real.split(os.sep)
        at = next((i for i in range(len(parts) - 1, -1, -1) if parts[i] == repo), None)
        rest = parts[at + 1 :] if at is not None else []
        if (rest[:1] == ["blobs"] and len(rest) == 2) or rest == ["snapshots", m.revision, *name.split("/")]:
            return real  # a blob, or a file copied into the snapshot where symlinks are not available
        expected = [hub_cache.RANGES_DIR, m.revision, *name.split("/")]
        if rest[:-1] == expected[:-1] and rest[-1:] == [expected[-1] + ".part"]:
            return real
        raise CheckpointError(
            f"{name}: {path} resolves to {real} on {where}, which is neither a blob of {repo} nor its "
            f"range store; refused"
        )

    def fetcher_class(self) -> type:
        from workers.sources.hub_fetcher import NodeFetcher

        return NodeFetcher

    def fetch_settings(self) -> dict:
        """The driver's endpoint (the plan's commit was resolved there); offline on the driver: on every node
        (else each node's own flag)."""
        return {"endpoint": hub_endpoint(), "offline": True if hub_offline() else None}
