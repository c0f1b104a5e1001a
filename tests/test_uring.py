"""The io_uring read engine and the span reader built on it, against plain file reads (no Ray)."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from planning.errors import CheckpointError
from workers import uring
from workers.reader import CheckpointFiles
from workers.span_reads import Span, coalesce, read_spans
from workers.staging import StagingRing

pytestmark = pytest.mark.skipif(not uring.available(), reason="io_uring is not available on this machine")


@pytest.fixture
def data_file(tmp_path):
    payload = os.urandom((3 << 20) + 12345)
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    return str(path), payload


def test_ring_reads_the_requested_ranges_and_reports_end_of_file_and_errors(data_file):
    path, payload = data_file
    fd = os.open(path, os.O_RDONLY)
    ring = uring.Ring(8)
    try:
        buffers = [bytearray(1000) for _ in range(3)]
        offsets = [0, 1 << 20, len(payload) - 1000]
        for tag, (buf, off) in enumerate(zip(buffers, offsets)):
            ring.read(fd, ctypes.addressof(ctypes.c_char.from_buffer(buf)), len(buf), off, tag=tag)
        done = []
        while len(done) < 3:
            done += ring.submit_and_wait(wait_for=1)
        assert sorted((c.tag, c.result) for c in done) == [(0, 1000), (1, 1000), (2, 1000)]
        for buf, off in zip(buffers, offsets):
            assert bytes(buf) == payload[off : off + 1000]
        past_end = bytearray(10)
        ring.read(fd, ctypes.addressof(ctypes.c_char.from_buffer(past_end)), 10, len(payload) + 5, tag=7)
        assert ring.submit_and_wait(wait_for=1) == [uring.Completion(7, 0)]  # end of file: 0 bytes
        ring.read(-1, ctypes.addressof(ctypes.c_char.from_buffer(past_end)), 10, 0, tag=9)
        (bad,) = ring.submit_and_wait(wait_for=1)
        assert bad.tag == 9 and bad.result < 0  # -EBADF, reported, not raised
    finally:
        ring.close()
        os.close(fd)


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_read_spans_fills_destinations_bit_exact(data_file, staged):
    """Direct reads into host memory, and the GPU path's staging on the host (its CPU seam): many
    pieces, fewer staging buffers than pieces, so buffers are reused."""
    path, payload = data_file
    storage = torch.zeros(len(payload), dtype=torch.uint8)
    cuts = [0, 5, 70000, 1 << 20, (1 << 20) + 3, len(payload)]
    spans = [Span("blob", a, storage[a:b], f"t{i}") for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    staging = StagingRing(3, 64 << 10, pin=False) if staged else None
    with CheckpointFiles({"blob": path}) as files:
        read_spans(files, spans[::-1], staging=staging, depth=4)
        assert files.bytes_read == len(payload)
    assert bytes(storage.numpy()) == payload


def test_coalesce_joins_only_what_is_adjacent_in_file_and_storage():
    storage = torch.zeros(100, dtype=torch.uint8)
    other = torch.zeros(100, dtype=torch.uint8)
    spans = [Span("f", 10, storage[10:20], "b"), Span("f", 0, storage[0:10], "a"),  # adjacent both ways
             Span("f", 20, other[20:30], "c"),  # adjacent in the file, another storage
             Span("g", 30, storage[20:30], "d")]  # adjacent in storage, another file
    joined = coalesce(spans)
    assert [(s.file, s.offset, s.dest.numel(), s.what) for s in joined] == [
        ("f", 0, 20, "from 'a' on"), ("f", 20, 10, "c"), ("g", 30, 10, "d")]
    assert joined[0].dest.data_ptr() == storage.data_ptr()


def test_a_truncated_file_is_an_error_naming_it(data_file, tmp_path):
    path, payload = data_file
    short = tmp_path / "short.bin"
    short.write_bytes(payload[:1000])
    dest = torch.zeros(5000, dtype=torch.uint8)
    with CheckpointFiles({"short": str(short)}) as files, pytest.raises(CheckpointError, match=r"short: unexpected end of file at byte 1000 .*truncated"):
        read_spans(files, [Span("short", 0, dest, "w")], staging=None, depth=2)
