"""Keep a rank's memory maps of checkpoint files valid when someone truncates or rewrites a file.

On CPU a rank maps checkpoint files: briefly, for strided copies while loading, and for good, for the
tensors that are a contiguous range of a file (zero-copy: the tensor *is* the mapped page cache). If the
file is truncated while mapped — ``save_pretrained`` into the same folder, a colleague's copy over a
shared checkpoint — the next touch of a page past the new end is a ``SIGBUS`` that kills the rank.
Linux offers a way to hear about it first: a read lease (``fcntl(F_SETLEASE, F_RDLCK)``). Whoever opens
the file for writing or truncates it then waits (up to ``/proc/sys/fs/lease-break-time``, 45 s by
default) while the lease holder gets a signal; the holder lets go when it no longer depends on the
file. Here, on that signal, each map of the file is made independent of it without moving: the byte
ranges that tensors still view are copied into anonymous memory that ``mremap`` puts at the very same
addresses (every view stays valid, same pointer, same bytes), the rest becomes anonymous zero pages
that nothing reads; then the lease is released and the writer goes on. The model keeps the weights it
loaded; nothing faults.

A file changed while the rank was still reading it is reported by the load (``changes``): what was
read may mix old and new bytes. A lease can be taken only on a file this user owns, on a local file
system, that nobody has open for writing; without one the reader does not keep a file mapped
(``protected`` is False: zero-copy falls back to copying).

The signal (a real-time one, ``F_SETSIG``) is directed at one watcher thread (``F_SETOWN_EX``) that
blocks it and waits for it with ``sigwaitinfo``, so it reaches no other thread of the rank's process and
needs no Python handler. Linux only; elsewhere ``protect`` returns False.

Runs on every rank (inside the Ray actor).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import signal
import struct
import sys
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

from planning.errors import CheckpointError

log = logging.getLogger("meshload")

F_SETLEASE, F_GETLEASE, F_SETSIG, F_SETOWN_EX, F_OWNER_TID = 1024, 1025, 10, 15, 0
LEASE_SIGNAL = signal.SIGRTMIN + 5 if hasattr(signal, "SIGRTMIN") else None
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
PAGE = mmap.PAGESIZE


@dataclass
class _Guarded:
    """One leased file: its own descriptor (it carries the lease), its maps and what they must keep."""

    name: str
    fd: int
    maps: list = field(default_factory=list)  # (weakref to mmap, [(start, end) byte ranges to keep])
    readers: int = 0


def _libc():
    # PyDLL keeps the GIL during the calls: no other thread can drop a map while it is being replaced.
    lib = ctypes.PyDLL(None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.mremap.restype = ctypes.c_void_p
    lib.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return lib


class FileGuard:
    """Read leases on one rank's checkpoint files (see module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._files: dict[str, _Guarded] = {}
        self._changed: dict[str, int] = {}  # file → times its lease broke (opened for writing or truncated)
        self._watcher: threading.Thread | None = None
        self._tid: int | None = None
        self._ready = threading.Event()

    # -- taking leases ---------------------------------------------------------------------------
    def protect(self, name: str, fd: int) -> bool:
        """Take a read lease on the file open at ``fd`` (on a descriptor of its own). False if Linux refuses one."""
        with self._lock:
            if name in self._files:
                return True
        if LEASE_SIGNAL is None or not sys.platform.startswith("linux") or not self._start_watcher():
            return False
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.fcntl(own, F_SETSIG, LEASE_SIGNAL)
            fcntl.fcntl(own, F_SETOWN_EX, struct.pack("ii", F_OWNER_TID, self._tid))
            fcntl.fcntl(own, F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:  # EACCES: not our file; EAGAIN: open for writing; EINVAL: a file system without leases
            log.debug("meshload: no read lease on %s (%s): it is not kept mapped", name, exc)
            os.close(own)
            return False
        with self._lock:
            self._files[name] = _Guarded(name, own)
        return True

    def protected(self, name: str) -> bool:
        with self._lock:
            return name in self._files

    def add_map(self, name: str, mapping: mmap.mmap) -> None:
        """``mapping`` (a map of file ``name``) is made independent of the file if the lease breaks."""
        with self._lock:
            guarded = self._files.get(name)
            if guarded is not None:
                guarded.maps.append((weakref.ref(mapping), []))

    def keep(self, name: str, mapping: mmap.mmap, start: int, end: int) -> None:
        """Bytes ``[start, end)`` of ``mapping`` are viewed by a tensor: they are copied, not zeroed, on a break."""
        with self._lock:
            guarded = self._files.get(name)
            for ref, ranges in guarded.maps if guarded else ():
                if ref() is mapping:
                    ranges.append((start, end))

    @contextmanager
    def reading(self, name: str):
        """Around a copy out of a map of ``name``: a break waits for it to finish; after a break, it is refused."""
        with self._lock:
            if name in self._changed:
                raise CheckpointError(f"{name}: the file was truncated or opened for writing while this rank read it")
            guarded = self._files.get(name)
            if guarded is not None:
                guarded.readers += 1
        try:
            yield
        finally:
            if guarded is not None:
                with self._lock:
                    guarded.readers -= 1
                    self._lock.notify_all()

    def drop_pages(self, name: str, drop) -> bool:
        """Call ``drop()`` (an ``madvise(MADV_DONTNEED)`` of pages that tensors view in a map of ``name``) only while
        those pages still map the file, whose bytes then come back on the next touch; after a break they are
        anonymous copies that dropping would zero. Returns whether it ran."""
        with self._lock:  # a break waits for it (``_release`` takes the lock before detaching)
            if name not in self._files:
                return False
            drop()
            return True

    def changes(self) -> dict[str, int]:
        """File name → times its lease broke (it was opened for writing or truncated) so far."""
        with self._lock:
            return dict(self._changed)

    # -- the watcher -------------------------------------------------------------------------------
    def _start_watcher(self) -> bool:
        with self._lock:
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="meshload-file-guard", daemon=True)
                self._watcher.start()
        self._ready.wait(10)
        return self._tid is not None

    def _watch(self) -> None:
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {LEASE_SIGNAL})
            self._tid = threading.get_native_id()
        finally:
            self._ready.set()
        while True:
            signal.sigwaitinfo({LEASE_SIGNAL})
            # The signal's siginfo names the descriptor, but Python does not expose si_fd: check each lease.
            with self._lock:
                files = list(self._files.values())
            for guarded in files:
                try:
                    broken = fcntl.fcntl(guarded.fd, F_GETLEASE) != fcntl.F_RDLCK
                except OSError:
                    continue
                if broken:
                    self._release(guarded)

    def _release(self, guarded: _Guarded) -> None:
        """Wait for copies out of the file's maps, make every map independent of the file, let the writer go."""
        with self._lock:
            self._changed[guarded.name] = self._changed.get(guarded.name, 0) + 1
            while guarded.readers:
                self._lock.wait(1.0)
            maps = [(ref(), list(ranges)) for ref, ranges in guarded.maps]
            guarded.maps = []
            del self._files[guarded.name]
        kept = 0
        for mapping, ranges in maps:
            if mapping is not None and not mapping.closed:
                kept += _detach(mapping, ranges)
        try:
            fcntl.fcntl(guarded.fd, F_SETLEASE, fcntl.F_UNLCK)
        finally:
            os.close(guarded.fd)
        log.warning("meshload: %s was truncated or opened for writing; this rank keeps the %d bytes it maps of it "
                    "in its own memory", guarded.name, kept)


def _detach(mapping: mmap.mmap, ranges: list[tuple[int, int]]) -> int:
    """Replace ``mapping``'s pages in place: ``ranges`` by anonymous copies, the rest by anonymous zeros."""
    lib = _libc()
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    length = -(-len(mapping) // PAGE) * PAGE
    keep = []
    for start, end in sorted(ranges):
        a, b = start // PAGE * PAGE, min(length, -(-end // PAGE) * PAGE)
        if keep and a <= keep[-1][1]:
            keep[-1][1] = max(keep[-1][1], b)
        elif b > a:
            keep.append([a, b])
    prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    pos = 0
    for a, b in keep + [[length, length]]:
        if a > pos:  # nothing views these pages any more: zeros, without reading the file
            if lib.mmap(base + pos, a - pos, prot, flags | 0x10, -1, 0) != base + pos:  # 0x10: MAP_FIXED
                raise OSError(ctypes.get_errno(), f"mmap over a released checkpoint map failed")
        if b > a:
            copy = lib.mmap(None, b - a, prot, flags, -1, 0)
            if copy in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "no memory for a copy of a checkpoint map")
            ctypes.memmove(copy, base + a, b - a)
            if lib.mremap(copy, b - a, b - a, MREMAP_MAYMOVE | MREMAP_FIXED, base + a) != base + a:
                raise OSError(ctypes.get_errno(), "mremap of a checkpoint map's copy failed")
        pos = max(pos, b)
    return sum(b - a for a, b in keep)
