"""Reads of planned boxes from real safetensors files: direct, strided, staged (cast, transpose), truncated."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from planning.checkpoint import build_local_index
from planning.errors import CheckpointError
from planning.plan import ReadItem
from workers.reader import CheckpointFiles, Progress, read_item


@pytest.fixture
def file(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "m": torch.randn(6, 10, dtype=torch.float32),
        "e": torch.randn(3, 4, 5, dtype=torch.bfloat16),
    }
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    return path, tensors, build_local_index(path)


def _item(index, name, src_box, dst_box, axes=None):
    entry = index.tensors[name]
    return ReadItem(name, entry.file, entry.start, entry.shape, entry.dtype, src_box, dst_box,
                    tuple(range(len(src_box))) if axes is None else axes)


def _read(path, index, item, dest):
    with CheckpointFiles({"model.safetensors": path}) as files:
        progress = Progress()
        read_item(files, item, dest, progress=progress, staging_bytes=40)  # tiny staging: several slabs
        return files.bytes_read, progress.done


@pytest.mark.parametrize(
    "src_box",
    [((0, 6), (0, 10)), ((2, 5), (0, 10)), ((0, 6), (5, 10)), ((1, 4), (3, 7))],
)
def test_direct_reads_only_the_box(file, src_box):
    path, tensors, index = file
    shape = tuple(b - a for a, b in src_box)
    dest = torch.full(shape, -1.0)
    item = _item(index, "m", src_box, tuple((0, n) for n in shape))
    n, done = _read(path, index, item, dest)
    assert torch.equal(dest, tensors["m"][src_box[0][0] : src_box[0][1], src_box[1][0] : src_box[1][1]])
    assert n == done == dest.numel() * 4


def test_into_part_of_destination(file):
    path, tensors, index = file
    dest = torch.zeros(6, 8)
    item = _item(index, "m", ((0, 6), (0, 4)), ((0, 6), (4, 8)))
    _read(path, index, item, dest)
    assert torch.equal(dest[:, 4:], tensors["m"][:, :4]) and (dest[:, :4] == 0).all()


def test_cast_goes_through_staging(file):
    path, tensors, index = file
    dest = torch.empty(3, 2, 5, dtype=torch.float32)
    item = _item(index, "e", ((0, 3), (2, 4), (0, 5)), ((0, 3), (0, 2), (0, 5)))
    n, _ = _read(path, index, item, dest)
    assert torch.equal(dest, tensors["e"][:, 2:4].float())
    assert n == 3 * 2 * 5 * 2  # bf16 bytes of the box only


def test_transpose(file):
    path, tensors, index = file
    dest = torch.empty(10, 3)
    item = _item(index, "m", ((1, 4), (0, 10)), ((0, 10), (0, 3)), axes=(1, 0))
    _read(path, index, item, dest)
    assert torch.equal(dest, tensors["m"][1:4].T)


def test_stack_inserted_dim(file):
    path, tensors, index = file
    dest = torch.zeros(2, 3, 10)
    item = _item(index, "m", ((3, 6), (0, 10)), ((1, 2), (0, 3), (0, 10)), axes=(None, 0, 1))
    _read(path, index, item, dest)
    assert torch.equal(dest[1], tensors["m"][3:6]) and (dest[0] == 0).all()


def test_truncated_file_is_a_clear_error(file):
    path, tensors, index = file
    item = _item(index, "e", ((0, 3), (0, 4), (0, 5)), ((0, 3), (0, 4), (0, 5)))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected end of file at byte \d+ while reading tensor 'e'"):
        _read(path, index, item, torch.empty(3, 4, 5, dtype=torch.bfloat16))


def test_parallel_pipeline_direct_and_staged(tmp_path):
    """Many items over 4 threads, direct and staged (cast) mixed, chunks larger than the staging ring's buffers."""
    from workers.reader import read_items

    torch.manual_seed(1)
    tensors = {f"t{i}": torch.randn(64, 48, dtype=torch.bfloat16 if i % 2 else torch.float32) for i in range(12)}
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    index = build_local_index(path)
    jobs, want = [], []
    for i, name in enumerate(sorted(tensors)):
        dest = torch.zeros(64, 24, dtype=torch.float32)
        box = ((0, 64), (24 * (i % 2), 24 * (i % 2) + 24))  # a dim-1 half: strided rows
        jobs.append((_item(index, name, box, ((0, 64), (0, 24))), dest))
        want.append(tensors[name][:, box[1][0] : box[1][1]].float())
    with CheckpointFiles({"model.safetensors": path}) as files:
        progress = Progress()
        read_items(files, jobs, progress=progress, threads=4, staging_bytes=1024)  # 1 KiB slabs: many chunks
        assert files.bytes_read == progress.done == sum(64 * 24 * t.element_size() for t in tensors.values())
    for (_, dest), expected in zip(jobs, want):
        assert torch.equal(dest, expected)
