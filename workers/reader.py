"""Read planned byte ranges of checkpoint files straight into parameter storage.

A ``ReadItem`` says "box B of tensor T goes to box D of this parameter". Both boxes are sets of
contiguous runs in their row-major layouts. Items are cut into chunks (slabs of rows, ≤ 64 MiB) and
a pool of threads reads them (``preadv`` releases the GIL, so reads run in parallel):

- *direct* (CPU destination, same dtype, nothing transposed): the file runs are ``preadv``-ed straight
  into the destination tensor's memory — no intermediate copy, no read outside the box (a dim-1 slice
  is one read per row, not a read of the whole matrix);
- *staged* (a cast, a transpose, or a CUDA destination): a chunk is read into a staging buffer taken
  from a fixed ring — page-locked when the destination is a GPU — and then copied/cast into place, on
  the GPU asynchronously on the reading thread's own stream, so the next reads overlap the copies.
  The ring bounds extra memory to ``threads × 2`` buffers, never a full-precision copy of the shard.

The CPU path and the CUDA path are the same code; only the buffer pinning and the copy's stream differ,
so CI (no GPU) exercises the pipeline.

Runs on every rank (inside the Ray actor), over node-local files.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from planning.boxes import Box, box_numel, box_shape, box_slices, replace_dim, run_offsets, runs, split_dim
from planning.errors import CheckpointError
from planning.plan import ReadItem
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE
from planning.source_expr import Fragment, fragment_view

MAX_IO_BYTES = 256 << 20  # one pread at most
IOV_MAX = 1024
DEFAULT_STAGING_BYTES = 64 << 20  # chunk size, and size of each staging buffer
DEFAULT_THREADS = 4
# Page-locking costs ~0.5-0.8 s per GiB (measured on a lent H100, docs/BENCHMARKS.md) while 8 threads
# preadv-ing 8 MiB chunks into page-locked memory reach ~43 GB/s: many small buffers, few bytes pinned.
CUDA_STAGING_BYTES = 8 << 20
CUDA_THREADS = 8


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
    """Open checkpoint files of one rank, by plan file name; counts bytes read. Thread-safe."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = dict(paths)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def fd(self, name: str) -> int:
        with self._lock:
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

    def close(self) -> None:
        with self._lock:
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
        with self._lock:
            self.bytes_read += got_total


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a contiguous CPU tensor's storage."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.view(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, dtype=np.uint8)


def read_box(
    files: CheckpointFiles,
    item: ReadItem,
    src_box: Box,
    dest: torch.Tensor,
    dst_box: Box,
    progress: Progress | None,
) -> None:
    """Read ``src_box`` of ``item``'s tensor into ``dst_box`` of contiguous CPU ``dest`` (same dtype, same element order)."""
    size = TORCH_DTYPE_ITEMSIZE[item.src_dtype]
    src = runs(item.src_shape, src_box, split=split_dim(src_box, item.src_shape))
    dst = runs(tuple(dest.shape), dst_box, split=split_dim(dst_box, tuple(dest.shape)))
    assert src.numel == dst.numel, (src, dst)
    out = byte_view(dest)
    src_offsets = run_offsets(src) * size + item.file_offset
    dst_offsets = run_offsets(dst) * size
    src_run, dst_run = src.run * size, dst.run * size
    what = f"tensor {item.tensor!r}"
    if src_run % dst_run == 0:
        # Each file run fills one or more whole destination runs: one preadv per file run.
        per = src_run // dst_run
        for i, file_off in enumerate(src_offsets.tolist()):
            dsts = dst_offsets[i * per : (i + 1) * per].tolist()
            _pread_chunked(files, item.file, [memoryview(out[d : d + dst_run]) for d in dsts], file_off, what, progress)
        return
    # General case (a destination run spans several file runs): walk both streams.
    si = di = 0
    s_left, d_left = src_run, dst_run
    while si < len(src_offsets):
        n = min(s_left, d_left)
        file_off = int(src_offsets[si]) + (src_run - s_left)
        dst_off = int(dst_offsets[di]) + (dst_run - d_left)
        _pread_chunked(files, item.file, [memoryview(out[dst_off : dst_off + n])], file_off, what, progress)
        s_left -= n
        d_left -= n
        if s_left == 0:
            si, s_left = si + 1, src_run
        if d_left == 0:
            di, d_left = di + 1, dst_run


def _pread_chunked(files, name, buffers, offset, what, progress) -> None:
    total = sum(len(b) for b in buffers)
    if total <= MAX_IO_BYTES:
        files.pread_into(name, buffers, offset, what=what)
        if progress is not None:
            progress.add(total)
        return
    for b in buffers:
        for start in range(0, len(b), MAX_IO_BYTES):
            piece = b[start : start + MAX_IO_BYTES]
            files.pread_into(name, [piece], offset, what=what)
            offset += len(piece)
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
    direct: bool
    span: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return box_numel(self.src_box) * TORCH_DTYPE_ITEMSIZE[self.item.src_dtype]


def _is_direct(item: ReadItem, dest: torch.Tensor) -> bool:
    frag = Fragment(item.tensor, item.src_box, item.dst_box, item.axes)
    return (
        dest.device.type == "cpu"
        and dest.is_contiguous()
        and str(dest.dtype).removeprefix("torch.") == item.src_dtype
        and not frag.is_permuted
    )


def chunks_of(item: ReadItem, dest: torch.Tensor, *, max_bytes: int) -> list[Chunk]:
    """Cut ``item`` into slabs of its source box's outermost dimension, each at most ``max_bytes`` (≥ 1 row)."""
    if box_numel(item.src_box) == 0:
        return []
    direct = _is_direct(item, dest)
    shape = box_shape(item.src_box)
    if not shape:
        return [Chunk(item, dest, item.src_box, item.dst_box, direct)]
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
        out.append(Chunk(item, dest, src_box, dst_box, direct, span))
    return out


class StagingRing:
    """At most ``count`` staging buffers (page-locked for GPU destinations), allocated on first need so
    that reading starts at once. A buffer goes back to the ring with the CUDA event of the copy out of
    it; it is handed out again only once that copy has finished."""

    def __init__(self, count: int, nbytes: int, *, pin: bool) -> None:
        self.nbytes = nbytes
        self.pin = pin
        self._free: queue.Queue = queue.Queue()
        self._left = count
        self._lock = threading.Lock()

    def take(self) -> tuple[torch.Tensor, np.ndarray, object]:
        """A buffer, a writable byte view of it, and its event (None until it first carries a copy)."""
        try:
            buffer, view, event = self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                grow = self._left > 0
                self._left -= grow
            if grow:
                buffer = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pin)
                return buffer, buffer.numpy(), None
            buffer, view, event = self._free.get()
        if event is not None:
            event.synchronize()
        return buffer, view, event

    def give(self, buffer: torch.Tensor, view: np.ndarray, event) -> None:
        self._free.put((buffer, view, event))


def _staged(chunk: Chunk, files: CheckpointFiles, ring: StagingRing, progress: Progress | None) -> None:
    item = chunk.item
    on_gpu = chunk.dest.device.type == "cuda"
    n = chunk.nbytes
    oversized = n > ring.nbytes
    if oversized:
        buffer = torch.empty(n, dtype=torch.uint8, pin_memory=ring.pin)
        view, event = buffer.numpy(), None
    else:
        buffer, view, event = ring.take()
    try:
        if chunk.span is not None:  # one range of the file → one range of dest: a single read, a 1-D copy
            files.pread_into(item.file, [memoryview(view[:n])], chunk.span[0], what=f"tensor {item.tensor!r}")
            if progress is not None:
                progress.add(n)
            source = buffer[:n]
            target = chunk.dest.view(-1).view(torch.uint8)[chunk.span[1] : chunk.span[1] + n]
        else:
            shape = box_shape(chunk.src_box)
            staging = buffer[:n].view(getattr(torch, item.src_dtype)).view(shape)
            read_box(files, item, chunk.src_box, staging, tuple((0, k) for k in shape), progress)
            source = fragment_view(Fragment(item.tensor, chunk.src_box, chunk.dst_box, item.axes), staging)
            target = chunk.dest[box_slices(chunk.dst_box)]
        if on_gpu:
            _use_thread_stream(chunk.dest.device)
            target.copy_(source, non_blocking=True)
            event = event or torch.cuda.Event()
            event.record()
            if oversized:
                event.synchronize()
        else:
            target.copy_(source)
    finally:
        if not oversized:
            ring.give(buffer, view, event)


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
) -> None:
    """Fill every ``dest[item.dst_box]`` (see module docstring); returns when all data is in place."""
    chunks = [c for item, dest in jobs for c in chunks_of(item, dest, max_bytes=staging_bytes)]
    if not chunks:
        return
    staged = [c for c in chunks if not c.direct]
    gpu = next((c.dest.device for c in staged if c.dest.device.type == "cuda"), None)
    workers = max(1, min(threads, len(chunks)))
    ring = StagingRing(min(2 * workers, len(staged)), staging_bytes, pin=gpu is not None) if staged else None

    def run(chunk: Chunk) -> None:
        if chunk.direct and chunk.span is not None:
            n = chunk.nbytes
            out = memoryview(byte_view(chunk.dest)[chunk.span[1] : chunk.span[1] + n])
            _pread_chunked(files, chunk.item.file, [out], chunk.span[0], f"tensor {chunk.item.tensor!r}", progress)
        elif chunk.direct:
            read_box(files, chunk.item, chunk.src_box, chunk.dest, chunk.dst_box, progress)
        else:
            _staged(chunk, files, ring, progress)

    if workers == 1:
        for chunk in chunks:
            run(chunk)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meshload-read") as pool:
            futures = [pool.submit(run, c) for c in chunks]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    if gpu is not None:
        torch.cuda.synchronize(gpu)  # every reader thread's stream


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
