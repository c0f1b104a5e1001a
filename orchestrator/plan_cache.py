"""Plans kept on the driver's disk, so a new driver loading the same checkpoint the same way skips planning.

Planning builds the model's meta skeleton, which imports transformers' model code: seconds of CPU in a
new process (``ray job submit``, a script), competing with the ranks' own start. The resolved checkpoint
(its config and safetensors headers, read anyway) plus the options decide the plan, so a plan made once
is stored under a key made of:

- the checkpoint as resolved: where it is (path, or Hub repo and commit), ``config.json``, and every
  file's name, size and tensor table (name, dtype, shape, byte range), i.e. what the headers say;
- every planning option (tp, pp, nodes, dtype, device, tp_plan, device_map, max_memory, ...);
- the code that plans: the plan format version, torch's and transformers' versions, and the content of
  meshload's ``planning`` sources (an edited checkout never reuses an older plan).

A file rewritten with the same header keeps its key (the plan only holds byte ranges, which are the
same); a changed header, config or option is a new key. An entry is a plan's JSON, read back through
``planning.plan_json.plan_from_json`` (which validates it); an unreadable entry is reported, replaced, and never
fatal, as is a folder that cannot be written.

An entry is a file anyone who can write the folder could have put there, so it is trusted no more
than a plan file: one not owned by this user, or reached through a symlink, is ignored; one that does
not match the checkpoint as resolved now (``get(check=...)``, ``planning.plan_check``) is reported,
removed and planned again. Entries are written private (0600, in a folder created 0700), atomically.

Folder: ``load(plan_cache=...)``, else ``$MESHLOAD_PLAN_CACHE``, else ``$XDG_CACHE_HOME/meshload/plans``
(``~/.cache/meshload/plans``). Entries are small (a 1.1B Llama at tp=2: ~230 KB); the folder keeps the
``MAX_ENTRIES`` most recently used (a hit refreshes an entry), and may be deleted at any time.

Runs on the driver (``orchestrator.api``): the plan cache is the orchestrator's, as its disk writes keep
``planning/`` pure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from functools import cache
from importlib import metadata
from pathlib import Path

log = logging.getLogger("meshload")

CACHE_ENV = "MESHLOAD_PLAN_CACHE"
MAX_ENTRIES = 64
STALE_TMP_S = 600.0  # writing an entry takes milliseconds; a temporary file this old was a killed driver's


def plan_cache_dir(chosen: str | os.PathLike | None = None) -> Path:
    """``chosen``, else ``$MESHLOAD_PLAN_CACHE``, else ``$XDG_CACHE_HOME/meshload/plans``."""
    if chosen:
        return Path(chosen).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meshload" / "plans"


@cache
def _code_fingerprint() -> str:
    """What makes plans: the plan format, torch, transformers, and meshload's planning sources."""
    import planning
    from planning.plan import PLAN_FORMAT_VERSION

    h = hashlib.sha256(f"format {PLAN_FORMAT_VERSION}".encode())
    for dist in ("torch", "transformers"):
        h.update(f"{dist} {metadata.version(dist)}".encode())
    here = Path(planning.__file__).parent
    for source in sorted(here.glob("*.py")):
        h.update(source.name.encode())
        h.update(source.read_bytes())
    return h.hexdigest()


def plan_key(resolved, options: dict) -> str:
    """The cache key of the plan ``make_plan`` would make for ``resolved`` (a ``ResolvedModel``) and ``options``."""
    index = resolved.index
    described = {
        "model": [resolved.kind, str(resolved.ref_source), resolved.root, resolved.revision],
        "config": resolved.config_dict,
        "format": index.format,
        "files": [[f.name, f.size, f.header_size, f.sha256, f.header_sha256, f.git_sha1] for f in index.files],
        "tensors": [[t.name, t.file, t.dtype, list(t.shape), t.start, t.end] for t in index.tensors.values()],
        "options": {k: options[k] for k in sorted(options)},
    }
    h = hashlib.sha256(_code_fingerprint().encode())
    h.update(json.dumps(described, sort_keys=True, default=_describe).encode())
    return h.hexdigest()


def _describe(value) -> object:
    """An option that is not JSON, for the key: a transformers config by all its values (its ``str`` shows only
    some: ``FineGrainedFP8Config(dequantize=True)`` and ``(dequantize=False)`` print alike), else its ``str``."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)


class PlanCache:
    """Get and put plans by key in one folder (see module docstring)."""

    def __init__(self, folder: str | os.PathLike | None = None, *, max_entries: int = MAX_ENTRIES) -> None:
        self.folder = plan_cache_dir(folder)
        self.max_entries = max_entries

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str, *, check=None):
        """The cached plan, or None (absent; unreadable, or refused by ``check(plan)``: then it is reported
        and removed; not this user's: reported and left alone)."""
        from planning.plan_json import plan_from_json

        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("meshload: plan cache entry %s cannot be read (%s); planning again", path, exc)
            return None
        try:
            with os.fdopen(fd, "r", encoding="utf-8") as f:
                owner = os.fstat(f.fileno()).st_uid
                if owner != os.getuid():
                    log.warning("meshload: plan cache entry %s belongs to uid %d, not to you; ignored, planning again",
                                path, owner)
                    return None
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("meshload: plan cache entry %s cannot be read (%s); planning again", path, exc)
            return None
        try:
            plan = plan_from_json(text)
            if check is not None:
                check(plan)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with an entry, planning again fixes it
            log.warning("meshload: plan cache entry %s is not a valid plan (%s); planning again", path, exc)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        try:
            os.utime(path)  # most recently used: kept longest
        except OSError:
            pass
        return plan

    def put(self, key: str, plan) -> Path | None:
        """Store ``plan`` under ``key`` (atomically: a reader sees the old entry or the whole new one)."""
        from planning.plan_json import plan_to_json

        path = self.path(key)
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key[:16]}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(plan_to_json(plan))
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("meshload: the plan cannot be cached in %s (%s); the load goes on", self.folder, exc)
            return None
        self._prune()
        return path

    def _prune(self) -> None:
        """Remove the least recently used entries beyond ``max_entries``, and what a driver killed while
        writing an entry left (a temporary file older than ``STALE_TMP_S``: one being written is younger)."""
        try:
            entries = sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
            for old in entries[: max(0, len(entries) - self.max_entries)]:
                old.unlink()
            for tmp in self.folder.glob(".*.tmp"):
                if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
        except OSError:  # another driver pruned it first
            pass
