"""Read planned byte ranges of checkpoint files straight into parameter storage.

A ``ReadItem`` says "box B of tensor T goes to box D of this parameter". Both boxes are sets of
contiguous runs in their row-major layouts; when dtypes match and nothing is transposed, the runs
are paired and each file run is ``preadv``-ed directly into the destination tensor's memory — no
intermediate copy of the shard, no read of the rest of the tensor (a dim-1 slice is one read per row,
not a read of the whole matrix). A cast or a transpose goes through a bounded staging buffer, one
slab of rows at a time, so an explicit dtype never needs a full-precision copy of the shard.

Runs on every rank (inside the Ray actor), over node-local files.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from planning.boxes import Box, box_numel, box_shape, box_slices, replace_dim, run_offsets, runs, split_dim
from planning.errors import CheckpointError
from planning.plan import ReadItem
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE
from planning.source_expr import Fragment, fragment_view

MAX_IO_BYTES = 256 << 20  # one pread at most (also the progress granularity)
IOV_MAX = 1024
DEFAULT_STAGING_BYTES = 64 << 20


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
    """Open checkpoint files of one rank, by plan file name; counts bytes read."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = dict(paths)
        self._fds: dict[str, int] = {}
        self.bytes_read = 0

    def fd(self, name: str) -> int:
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
        while buffers:
            got = os.preadv(fd, buffers[:IOV_MAX], offset)
            if got == 0:
                raise CheckpointError(
                    f"{name}: unexpected end of file at byte {offset} while reading {what} ({want} bytes wanted); "
                    f"the file is truncated"
                )
            self.bytes_read += got
            offset += got
            while buffers and got >= len(buffers[0]):
                got -= len(buffers[0])
                buffers = buffers[1:]
            if got:
                buffers[0] = buffers[0][got:]


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
    if src_run == dst_run or src_run % dst_run == 0:
        # Each file run fills one or more whole destination runs: one preadv per file run (split if huge).
        per = src_run // dst_run
        for i, file_off in enumerate(src_offsets.tolist()):
            dsts = dst_offsets[i * per : (i + 1) * per].tolist()
            buffers = [memoryview(out[d : d + dst_run]) for d in dsts]
            _pread_chunked(files, item.file, buffers, file_off, what, progress)
        return
    # General case (a destination run spans several file runs, or they interleave): walk both streams.
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


def _is_direct(item: ReadItem, dest: torch.Tensor) -> bool:
    frag = Fragment(item.tensor, item.src_box, item.dst_box, item.axes)
    return (
        dest.device.type == "cpu"
        and dest.is_contiguous()
        and str(dest.dtype).removeprefix("torch.") == item.src_dtype
        and not frag.is_permuted
    )


def read_item(
    files: CheckpointFiles,
    item: ReadItem,
    dest: torch.Tensor,
    *,
    progress: Progress | None = None,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
) -> None:
    """Fill ``dest[item.dst_box]`` from the checkpoint (see module docstring)."""
    if box_numel(item.src_box) == 0:
        return
    if _is_direct(item, dest):
        read_box(files, item, item.src_box, dest, item.dst_box, progress)
        return
    # Staged: slabs along the source box's outermost dimension, each read directly into a staging
    # tensor of the source dtype, then rearranged/cast into the destination.
    src_dtype = getattr(torch, item.src_dtype)
    itemsize = TORCH_DTYPE_ITEMSIZE[item.src_dtype]
    shape = box_shape(item.src_box)
    frag = Fragment(item.tensor, item.src_box, item.dst_box, item.axes)
    row_bytes = box_numel(item.src_box) // max(shape[0], 1) * itemsize if shape else itemsize
    rows_per_slab = max(1, staging_bytes // max(row_bytes, 1)) if shape else 1
    dst_dim0 = item.axes.index(0) if shape else None
    s0, s1 = item.src_box[0] if shape else (0, 1)
    for a in range(s0, s1, rows_per_slab):
        b = min(s1, a + rows_per_slab)
        sub_src = replace_dim(item.src_box, 0, (a, b)) if shape else item.src_box
        staging = torch.empty(box_shape(sub_src), dtype=src_dtype)
        read_box(files, item, sub_src, staging, tuple((0, n) for n in staging.shape), progress)
        dst_box = item.dst_box
        if dst_dim0 is not None:
            d0 = item.dst_box[dst_dim0][0]
            dst_box = replace_dim(dst_box, dst_dim0, (d0 + a - s0, d0 + b - s0))
        sub_frag = Fragment(frag.tensor, sub_src, dst_box, frag.axes)
        dest[box_slices(dst_box)].copy_(fragment_view(sub_frag, staging), non_blocking=dest.device.type == "cuda")
