"""Read planned byte ranges of checkpoint files straight into parameter storage.

A ``ReadItem`` says "box B of tensor T goes to box D of this parameter". Items are cut into chunks
(slabs of rows, ≤ 64 MiB, 8 MiB for GPUs), and each chunk takes one of two paths:

- *one span* — the slab is one contiguous byte range of the file landing, in the same dtype and order,
  in one contiguous range of the destination (whole tensors, dim-0 shards, replicated tensors): these
  are read by one thread keeping many reads in flight through io_uring (``workers.span_reads``),
  straight into the destination's memory (CPU) or into page-locked staging buffers followed by
  asynchronous host-to-device copies (GPU). Where io_uring is not available (another CPU
  architecture, a container that forbids it, ``MESHLOAD_NO_URING=1``) a pool of threads ``preadv``s
  them instead;
- *strided or converted* — a dim-1 slice (one run per row), a cast, a transpose: the source tensor is
  viewed through a read-only memory map of the file and the box is copied out in one ``copy_`` (a C
  loop, not a Python loop over rows), casting on the way, by a pool of threads; only the box's pages
  are touched. For a GPU the copy lands in a staging buffer first.

Staging buffers come from small rings (``workers.staging``), so extra memory is bounded and a cast
never needs a full-precision copy of the shard. The CPU and GPU paths are the same code; only buffer
pinning and the copy's stream differ, so CI (no GPU) exercises the pipeline.

A file shorter than the plan says is a ``CheckpointError`` naming it (never a SIGBUS from the map).

Runs on every rank (inside the Ray actor), over node-local files.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from planning.boxes import Box, box_numel, box_shape, box_slices, byte_span, replace_dim, runs
from planning.errors import CheckpointError
from planning.plan import ReadItem
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE
from planning.source_expr import Fragment, fragment_view
from workers import uring
from workers.span_reads import Span, read_spans
from workers.staging import StagingBuffer, StagingRing

MAX_IO_BYTES = 256 << 20  # one pread at most
IOV_MAX = 1024
DEFAULT_STAGING_BYTES = 64 << 20  # chunk size, and size of each staging buffer
DEFAULT_THREADS = 4
# Page-locking costs ~0.5-0.8 s per GiB (measured on a lent H100, docs/BENCHMARKS.md) while 8 threads
# preadv-ing 8 MiB chunks into page-locked memory reach ~43 GB/s: many small buffers, few bytes pinned.
CUDA_STAGING_BYTES = 8 << 20
CUDA_THREADS = 8
URING_DEPTH = 16  # reads in flight through io_uring (and GPU staging buffers): 47.8 GB/s warm on an H200 host


def io_defaults(device: torch.device) -> tuple[int, int]:
    """(reader threads, chunk/staging bytes) for a destination device."""
    if device.type == "cuda":
        return min(CUDA_THREADS, os.cpu_count() or CUDA_THREADS), CUDA_STAGING_BYTES
    return DEFAULT_THREADS, DEFAULT_STAGING_BYTES


class Progress:
    """Bytes done out of bytes planned; read by the driver's progress bar from another thread."""

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.done = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n


class CheckpointFiles:
    """Open checkpoint files of one rank, by plan file name: descriptors for ``preadv``, read-only maps
    for strided copies; counts bytes read. Thread-safe."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = dict(paths)
        self._fds: dict[str, int] = {}
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def fd(self, name: str) -> int:
        with self._lock:
            return self._open(name)

    def _open(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            path = self.paths.get(name)
            if path is None:
                raise CheckpointError(f"{name}: no local path for this checkpoint file on this node")
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise CheckpointError(f"{name}: file not found at {path}") from None
            self._fds[name] = fd
        return fd

    def tensor(self, item: ReadItem) -> torch.Tensor:
        """The whole source tensor of ``item`` as a read-only view of the mapped file."""
        with self._lock:
            entry = self._maps.get(item.file)
            if entry is None:
                fd = self._open(item.file)
                size = os.fstat(fd).st_size
                # Private copy-on-write map: reads share the page cache; a write (never ours) stays private.
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) if size else None
                entry = self._maps[item.file] = (mapping, size)
        mapping, size = entry
        nbytes = int(np.prod(item.src_shape, dtype=np.int64)) * TORCH_DTYPE_ITEMSIZE[item.src_dtype]
        if item.file_offset + nbytes > size:
            raise CheckpointError(
                f"{item.file}: unexpected end of file at byte {size} while reading tensor {item.tensor!r} "
                f"(it needs bytes up to {item.file_offset + nbytes}); the file is truncated"
            )
        flat = torch.frombuffer(mapping, dtype=getattr(torch, item.src_dtype), count=nbytes // TORCH_DTYPE_ITEMSIZE[item.src_dtype], offset=item.file_offset)
        return flat.view(item.src_shape)

    def advise(self, item: ReadItem, box: Box, advice: int) -> None:
        """``madvise`` the mapped pages holding ``box`` of ``item``'s tensor (after ``tensor(item)`` mapped it)."""
        mapping, _ = self._maps[item.file]
        start, end = byte_span(item.src_shape, box, itemsize=TORCH_DTYPE_ITEMSIZE[item.src_dtype], offset=item.file_offset)
        start -= start % mmap.PAGESIZE
        if end > start:
            mapping.madvise(advice, start, min(end, len(mapping)) - start)

    def release(self, item: ReadItem, box: Box) -> None:
        """Unmap (from this process only) the pages a finished strided copy touched, so mapped file pages
        do not pile up in the rank's resident memory; they stay in the page cache."""
        self.advise(item, box, mmap.MADV_DONTNEED)

    def count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def close(self) -> None:
        with self._lock:
            # Never mmap.close(): a tensor from torch.frombuffer holds a reference to its map, not a buffer
            # export, so closing would leave it dangling. Dropping ours unmaps each map when its last
            # tensor goes (at once for maps only used for copies).
            self._maps.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "CheckpointFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pread_into(self, name: str, buffers: list[memoryview], offset: int, *, what: str) -> None:
        """Fill ``buffers`` (in order) from ``offset`` of file ``name``; a short read is a truncated file."""
        fd = self.fd(name)
        want = sum(len(b) for b in buffers)
        got_total = 0
        while buffers:
            got = os.preadv(fd, buffers[:IOV_MAX], offset)
            if got == 0:
                raise CheckpointError(
                    f"{name}: unexpected end of file at byte {offset} while reading {what} ({want} bytes wanted); "
                    f"the file is truncated"
                )
            got_total += got
            offset += got
            while buffers and got >= len(buffers[0]):
                got -= len(buffers[0])
                buffers = buffers[1:]
            if got:
                buffers[0] = buffers[0][got:]
        self.count(got_total)


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a contiguous CPU tensor's storage."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.view(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, dtype=np.uint8)


def _pread_span(files: CheckpointFiles, item: ReadItem, out: memoryview, offset: int, progress: Progress | None) -> None:
    """One contiguous file range into ``out``, in pieces of at most ``MAX_IO_BYTES``."""
    what = f"tensor {item.tensor!r}"
    for start in range(0, len(out), MAX_IO_BYTES):
        piece = out[start : start + MAX_IO_BYTES]
        files.pread_into(item.file, [piece], offset + start, what=what)
        if progress is not None:
            progress.add(len(piece))


@dataclass(frozen=True, slots=True)
class Chunk:
    """A slab of one ``ReadItem``: ``src_box`` rows of the source into ``dst_box`` of ``dest``.

    ``span`` is set when the slab is one contiguous byte range of the file landing, in the same dtype and
    order, in one contiguous byte range of ``dest``: ``(file offset, dest byte offset)`` — the fast path."""

    item: ReadItem
    dest: torch.Tensor
    src_box: Box
    dst_box: Box
    span: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return box_numel(self.src_box) * TORCH_DTYPE_ITEMSIZE[self.item.src_dtype]

    def source_view(self, files: CheckpointFiles) -> torch.Tensor:
        """The slab rearranged into the destination box's shape, still in the mapped file (not read yet)."""
        item = self.item
        region = files.tensor(item)[box_slices(self.src_box)]
        return fragment_view(Fragment(item.tensor, self.src_box, self.dst_box, item.axes), region)


def chunks_of(item: ReadItem, dest: torch.Tensor, *, max_bytes: int) -> list[Chunk]:
    """Cut ``item`` into slabs of its source box's outermost dimension, each at most ``max_bytes`` (≥ 1 row)."""
    if box_numel(item.src_box) == 0:
        return []
    shape = box_shape(item.src_box)
    if not shape:
        return [Chunk(item, dest, item.src_box, item.dst_box)]
    row_bytes = box_numel(item.src_box) // shape[0] * TORCH_DTYPE_ITEMSIZE[item.src_dtype]
    rows = max(1, max_bytes // max(row_bytes, 1))
    dst_dim = item.axes.index(0)
    s0, s1 = item.src_box[0]
    d0 = item.dst_box[dst_dim][0]
    same_layout = str(dest.dtype).removeprefix("torch.") == item.src_dtype and dest.is_contiguous() and not (
        Fragment(item.tensor, item.src_box, item.dst_box, item.axes).is_permuted
    )
    itemsize = TORCH_DTYPE_ITEMSIZE[item.src_dtype]
    out = []
    for a in range(s0, s1, rows):
        b = min(s1, a + rows)
        src_box = replace_dim(item.src_box, 0, (a, b))
        dst_box = replace_dim(item.dst_box, dst_dim, (d0 + a - s0, d0 + b - s0))
        span = None
        if same_layout:
            src, dst = runs(item.src_shape, src_box), runs(tuple(dest.shape), dst_box)
            if src.count == 1 and dst.count == 1:
                span = (item.file_offset + src.first * itemsize, dst.first * itemsize)
        out.append(Chunk(item, dest, src_box, dst_box, span))
    return out


def _to_cpu(chunk: Chunk, files: CheckpointFiles, progress: Progress | None) -> None:
    """A chunk whose destination is in host memory: no staging at all."""
    n = chunk.nbytes
    if chunk.span is not None:
        out = memoryview(byte_view(chunk.dest)[chunk.span[1] : chunk.span[1] + n])
        _pread_span(files, chunk.item, out, chunk.span[0], progress)
        return
    chunk.dest[box_slices(chunk.dst_box)].copy_(chunk.source_view(files))  # strided and/or cast, in C
    files.release(chunk.item, chunk.src_box)
    files.count(n)
    if progress is not None:
        progress.add(n)


def _to_gpu(chunk: Chunk, files: CheckpointFiles, ring: StagingRing, progress: Progress | None) -> None:
    """A chunk for a GPU: into a page-locked staging buffer, then an asynchronous copy on this thread's stream."""
    item = chunk.item
    n = chunk.nbytes
    oversized = n > ring.nbytes
    buffer = StagingBuffer(n, pin=ring.pin) if oversized else ring.take()
    try:
        if chunk.span is not None:
            _pread_span(files, item, memoryview(buffer.array[:n]), chunk.span[0], progress)
            source = buffer.tensor[:n]
            target = chunk.dest.view(-1).view(torch.uint8)[chunk.span[1] : chunk.span[1] + n]
        else:
            region = chunk.source_view(files)
            source = buffer.tensor[:n].view(region.dtype).view(region.shape)
            source.copy_(region)  # strided gather from the map into contiguous staging
            files.release(item, chunk.src_box)
            files.count(n)
            if progress is not None:
                progress.add(n)
            target = chunk.dest[box_slices(chunk.dst_box)]
        _use_thread_stream(chunk.dest.device)
        target.copy_(source, non_blocking=True)  # the cast, if any, happens on the GPU
        buffer.event = torch.cuda.Event()
        buffer.event.record()
        if oversized:
            buffer.wait()
    finally:
        if not oversized:
            ring.give(buffer)


_streams = threading.local()


def _use_thread_stream(device: torch.device) -> None:
    """Make this reader thread's own CUDA stream current (once per thread), so copies from different
    threads overlap each other and the reads."""
    if getattr(_streams, "device", None) != device:
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))  # destinations were allocated on the default stream
        torch.cuda.set_stream(stream)
        _streams.device = device


def read_items(
    files: CheckpointFiles,
    jobs: list[tuple[ReadItem, torch.Tensor]],
    *,
    progress: Progress | None = None,
    threads: int = DEFAULT_THREADS,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    staging: StagingRing | None = None,
    uring_depth: int = URING_DEPTH,
) -> None:
    """Fill every ``dest[item.dst_box]`` (see module docstring); returns when all data is in place.

    ``staging``: the rank's page-locked ring for GPU spans (made here if not given)."""
    chunks = [c for item, dest in jobs for c in chunks_of(item, dest, max_bytes=staging_bytes)]
    if not chunks:
        return
    gpu = next((c.dest.device for c in chunks if c.dest.device.type == "cuda"), None)
    spans: list[Span] = []
    if uring.available():
        spans = [Span(c.item.file, c.span[0], c.dest.view(-1).view(torch.uint8)[c.span[1] : c.span[1] + c.nbytes], c.item.tensor)
                 for c in chunks if c.span is not None]
        chunks = [c for c in chunks if c.span is None]
    if gpu is not None and spans and staging is None:
        staging = StagingRing(uring_depth, staging_bytes, pin=True)
    workers = max(1, min(threads, len(chunks)))
    ring = StagingRing(2 * workers, staging_bytes, pin=True) if gpu is not None and chunks else None

    def run(chunk: Chunk) -> None:
        if chunk.dest.device.type == "cuda":
            _to_gpu(chunk, files, ring, progress)
        else:
            _to_cpu(chunk, files, progress)

    with _responsive_switching(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meshload-read") as pool:
        futures = [pool.submit(run, c) for c in chunks]  # strided and converted chunks, on the pool
        try:
            read_spans(files, spans, staging=staging, depth=uring_depth, progress=progress)  # spans, on this thread
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if gpu is not None:
        torch.cuda.synchronize(gpu)  # every reader thread's stream


@contextlib.contextmanager
def _responsive_switching(interval_s: float = 5e-4):
    """While reading, a thread holding the GIL (a rank importing transformers in the background, say) hands
    it over after ``interval_s`` instead of Python's default 5 ms, so completions are reaped without waiting."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, interval_s))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def zero_copy_view(files: CheckpointFiles, param) -> torch.Tensor | None:
    """The whole local tensor of ``param`` as a view of the mapped file, when it is exactly one contiguous
    range of one file in the right dtype and order (no padding, no cast, no transpose); else None.

    Such a tensor costs no copy and no memory of its own: its pages are the page cache's, shared by every
    rank of the node that maps them, and the kernel is asked to start reading them in (``WILLNEED``)."""
    if len(param.reads) != 1 or (param.shard is not None and param.shard.padding):
        return None
    item = param.reads[0]
    if item.src_dtype != param.dtype or item.dst_box != tuple((0, n) for n in param.shape):
        return None
    if Fragment(item.tensor, item.src_box, item.dst_box, item.axes).is_permuted or runs(item.src_shape, item.src_box).count != 1:
        return None
    view = files.tensor(item)[box_slices(item.src_box)]
    files.advise(item, item.src_box, mmap.MADV_WILLNEED)
    files.count(item.nbytes)
    return view.reshape(param.shape)


def read_item(
    files: CheckpointFiles,
    item: ReadItem,
    dest: torch.Tensor,
    *,
    progress: Progress | None = None,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
) -> None:
    """Fill ``dest[item.dst_box]`` from the checkpoint, on this thread."""
    read_items(files, [(item, dest)], progress=progress, threads=1, staging_bytes=staging_bytes)
