"""A minimal io_uring for reading file ranges into memory we own, from Python, through ``ctypes``.

Why it exists: reading a checkpoint that sits in the page cache is a memory copy done by the kernel,
and how fast it goes depends on how many copies run at once and what each costs to issue. A pool of
Python threads calling ``preadv`` pays a system call, a GIL hand-off and a user-space copy per
request; io_uring lets one thread keep many reads in flight, each punted to a kernel worker
(``IOSQE_ASYNC``), so the copies run in parallel in the kernel while Python only fills and reaps
queue entries. The fastest page-cache loader we measured (instanttensor's buffered backend) is built
this way. No maintained Python binding was fit for this path (the one on the package index marks its
buffer functions "coded but not tested"), and the part we need is small: set up a ring, queue
``IORING_OP_READ`` requests, reap completions.

Only the x86-64 memory model is assumed (stores are seen in program order, so filling an entry and
then bumping the queue's tail needs no fence); elsewhere ``available()`` is False and callers use
threads. Runs on every rank, in the reader.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import threading
from dataclasses import dataclass

_SYS_SETUP, _SYS_ENTER = 425, 426  # x86-64 syscall numbers
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1
_ENTER_GETEVENTS = 1
_OP_READ = 22
_SQE_ASYNC = 1 << 4
_SQE_BYTES, _CQE_BYTES = 64, 16


class _SqOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")] + [
        ("user_addr", ctypes.c_uint64)
    ]


class _CqOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")] + [
        ("user_addr", ctypes.c_uint64)
    ]


class _Params(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("sq_entries", "cq_entries", "flags", "sq_thread_cpu", "sq_thread_idle", "features", "wq_fd")] + [
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqOffsets),
        ("cq_off", _CqOffsets),
    ]


class _Sqe(ctypes.Structure):
    _fields_ = [
        ("opcode", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("ioprio", ctypes.c_uint16),
        ("fd", ctypes.c_int32),
        ("off", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("rw_flags", ctypes.c_uint32),
        ("user_data", ctypes.c_uint64),
        ("pad", ctypes.c_uint64 * 3),
    ]


class _Cqe(ctypes.Structure):
    _fields_ = [("user_data", ctypes.c_uint64), ("res", ctypes.c_int32), ("flags", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(*args) -> int:
    ret = _libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


_AVAILABLE: bool | None = None
_LOCK = threading.Lock()


def available() -> bool:
    """True when io_uring can be used here (x86-64 Linux, not disabled, a ring can be set up)."""
    global _AVAILABLE
    with _LOCK:
        if _AVAILABLE is None:
            _AVAILABLE = False
            if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64") and not os.environ.get("MESHLOAD_NO_URING"):
                try:
                    Ring(4).close()
                    _AVAILABLE = True
                except OSError:
                    pass
        return _AVAILABLE


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished read: the ``tag`` it was queued with and its result (bytes read, or ``-errno``)."""

    tag: int
    result: int


class Ring:
    """One io_uring of ``entries`` slots, used from one thread at a time: ``read`` queues, ``submit_and_wait`` reaps."""

    def __init__(self, entries: int) -> None:
        params = _Params()
        self.fd = _syscall(_SYS_SETUP, entries, ctypes.byref(params))
        try:
            sq, cq = params.sq_off, params.cq_off
            sq_size = sq.array + params.sq_entries * 4
            cq_size = cq.cqes + params.cq_entries * _CQE_BYTES
            if params.features & _FEAT_SINGLE_MMAP:
                sq_size = cq_size = max(sq_size, cq_size)
            self._sq_map = mmap.mmap(self.fd, sq_size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQ_RING)
            self._cq_map = (
                self._sq_map
                if params.features & _FEAT_SINGLE_MMAP
                else mmap.mmap(self.fd, cq_size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_CQ_RING)
            )
            self._sqe_map = mmap.mmap(self.fd, params.sq_entries * _SQE_BYTES, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                      mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQES)
        except BaseException:
            os.close(self.fd)
            raise
        sq_base = ctypes.addressof(ctypes.c_char.from_buffer(self._sq_map))
        cq_base = ctypes.addressof(ctypes.c_char.from_buffer(self._cq_map))
        self._sq_tail = ctypes.c_uint32.from_address(sq_base + sq.tail)
        self._sq_head = ctypes.c_uint32.from_address(sq_base + sq.head)
        self._sq_mask = ctypes.c_uint32.from_address(sq_base + sq.ring_mask).value
        self._sq_array = (ctypes.c_uint32 * params.sq_entries).from_address(sq_base + sq.array)
        self._sqes = (_Sqe * params.sq_entries).from_buffer(self._sqe_map)
        self._cq_head = ctypes.c_uint32.from_address(cq_base + cq.head)
        self._cq_tail = ctypes.c_uint32.from_address(cq_base + cq.tail)
        self._cq_mask = ctypes.c_uint32.from_address(cq_base + cq.ring_mask).value
        self._cqes = (_Cqe * params.cq_entries).from_address(cq_base + cq.cqes)
        self.entries = params.sq_entries
        self._queued = 0  # entries written but not yet submitted
        self.in_flight = 0  # submitted, not yet reaped

    def read(self, fd: int, address: int, nbytes: int, offset: int, *, tag: int) -> None:
        """Queue a read of ``nbytes`` at ``offset`` of ``fd`` into memory at ``address`` (kept alive by the caller)."""
        if self.in_flight + self._queued >= self.entries:
            raise RuntimeError(f"io_uring full ({self.entries} entries in flight)")
        tail = self._sq_tail.value
        index = tail & self._sq_mask
        sqe = self._sqes[index]
        ctypes.memset(ctypes.addressof(sqe), 0, _SQE_BYTES)
        sqe.opcode, sqe.flags, sqe.fd = _OP_READ, _SQE_ASYNC, fd
        sqe.off, sqe.addr, sqe.len, sqe.user_data = offset, address, nbytes, tag
        self._sq_array[index] = index
        self._sq_tail.value = (tail + 1) & 0xFFFFFFFF  # publishes the entry (x86: stores stay in order)
        self._queued += 1

    def submit_and_wait(self, *, wait_for: int = 1) -> list[Completion]:
        """Submit what was queued, wait until at least ``wait_for`` reads finished, return every finished one."""
        wait_for = min(wait_for, self.in_flight + self._queued)
        submitted = 0
        while True:  # the kernel submits the queued entries, then waits for ``wait_for`` completions
            try:
                submitted += _syscall(_SYS_ENTER, self.fd, self._queued - submitted, wait_for, _ENTER_GETEVENTS if wait_for else 0, None, 0)
            except InterruptedError:
                continue
            if submitted >= self._queued:
                break
        self.in_flight += self._queued
        self._queued = 0
        out = []
        head = self._cq_head.value
        tail = self._cq_tail.value
        while head != tail:
            cqe = self._cqes[head & self._cq_mask]
            out.append(Completion(cqe.user_data, cqe.res))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_head.value = head
        self.in_flight -= len(out)
        return out

    def close(self) -> None:
        """Unmap the rings and close the ring's descriptor (reads still in flight must have been reaped)."""
        if self.fd < 0:
            return
        self._sqes = self._sq_array = self._cqes = None  # ctypes views into the maps go first
        self._sq_tail = self._sq_head = self._cq_head = self._cq_tail = None
        for m in {id(m): m for m in (self._sq_map, self._cq_map, self._sqe_map)}.values():
            m.close()
        os.close(self.fd)
        self.fd = -1
