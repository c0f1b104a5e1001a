"""Remove what a node fetcher leaves half-written when its process is killed, as soon as it dies.

A fetcher's process can die at any moment: its driver was killed (Ray then kills the actors the driver
owned), the OOM killer, a drained node. What it was writing then stays on the node's disk:
huggingface_hub's temporary download (``blobs/<sha256>.<random>.incomplete``, a name no later download
resumes) and a byte-range ``.part`` file whose manifest was never written (nothing in it is vouched
for). A killed process runs no cleanup of its own, so the fetcher starts a small watcher process
(``main``) holding the read end of a pipe, and tells it, for every file it begins, what would be left
half-written; it writes ``done`` when its fetch ends. If the pipe ends without ``done`` — the fetcher
died — the watcher removes those leftovers (each only while no other process holds that file's lock:
a download elsewhere is not a leftover) and exits. A ``.part`` file with a manifest is kept: it is the
range store's resumable state, and what its manifest lists is on disk.

The watcher detaches itself (a double fork), so it is not a child of the fetcher's process: Ray kills
a dying worker's children.

Runs on each node: ``Janitor`` in the fetcher's process, ``main`` in the watcher's own.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

log = logging.getLogger("meshload")


class Janitor:
    """The fetcher's end: starts the watcher on first use; ``close()`` when the fetch has ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._broken = False

    def watch_download(self, *, blobs_dir: str, sha256: str, lock: str) -> None:
        """A whole-file download of blob ``sha256`` into ``blobs_dir`` begins (huggingface_hub's ``lock``)."""
        self._send({"kind": "download", "blobs_dir": blobs_dir, "sha256": sha256, "lock": lock})

    def watch_part(self, *, data: str, manifest: str, lock: str) -> None:
        """Byte ranges are about to be written into ``data``, vouched for by ``manifest`` (our ``lock``)."""
        self._send({"kind": "part", "data": data, "manifest": manifest, "lock": lock})

    def close(self) -> None:
        """The fetch ended (done, failed or cancelled, its own cleanup run): nothing for the watcher to do."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            try:
                proc.stdin.write(b'{"kind": "done"}\n')
                proc.stdin.close()
            except OSError:
                pass

    def _send(self, message: dict) -> None:
        with self._lock:
            if self._broken:
                return
            try:
                if self._proc is None:
                    self._proc = _start_watcher()
                self._proc.stdin.write(json.dumps(message).encode() + b"\n")
                self._proc.stdin.flush()
            except OSError as exc:  # best effort: the fetch itself does not depend on it
                self._broken = True
                log.warning("meshload: the fetch janitor could not be started or reached (%s); a killed fetch "
                            "may leave temporary files until the next fetch of the same files", exc)


def _start_watcher() -> subprocess.Popen:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from workers.fetch_janitor import main; main()"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    proc.wait(timeout=30)  # the first process only forks the watcher and exits
    return proc


def main() -> None:
    """The watcher: read what the fetcher begins; if the pipe ends without ``done``, remove the leftovers."""
    if os.fork():
        os._exit(0)  # the watcher is the grandchild: no longer a child of the fetcher's process
    watched: list[dict] = []
    for line in sys.stdin.buffer:
        message = json.loads(line)
        if message["kind"] == "done":
            return
        watched.append(message)
    for message in watched:  # the fetcher died mid-fetch
        try:
            _remove_leftovers(message)
        except OSError:
            pass


def remove_stale_downloads(*, blobs_dir: str, sha256: str, lock: str) -> list[str]:
    """Remove huggingface_hub's temporary downloads of blob ``sha256`` (``<sha256>.<random>.incomplete``:
    a later download never resumes them) unless a process holds ``lock`` (downloading it now); returns
    the names removed."""
    from filelock import FileLock, Timeout

    try:
        stale = [n for n in os.listdir(blobs_dir) if n.startswith(sha256 + ".") and n.endswith(".incomplete")]
    except FileNotFoundError:
        return []
    if not stale:
        return []
    held = FileLock(lock, mode=0o664)
    try:
        held.acquire(timeout=0)
    except Timeout:
        return []  # a download of this blob is in progress elsewhere: its files are not stale
    try:
        for name in stale:
            try:
                os.unlink(os.path.join(blobs_dir, name))
            except FileNotFoundError:
                pass
    finally:
        held.release()
    return stale


def _remove_leftovers(message: dict) -> None:
    """What a dead fetcher was writing, unless another process is writing it now."""
    from filelock import FileLock, Timeout

    if message["kind"] == "download":
        remove_stale_downloads(blobs_dir=message["blobs_dir"], sha256=message["sha256"], lock=message["lock"])
        return
    held = FileLock(message["lock"])
    try:
        held.acquire(timeout=0)
    except Timeout:
        return  # another process is fetching this file now: what is there is its own
    try:
        if not os.path.exists(message["manifest"]) and os.path.exists(message["data"]):
            os.unlink(message["data"])
    finally:
        held.release()
