"""Header parsing: golden bytes, and every malformed header rejected with the file, tensor and values."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from planning.errors import CheckpointError
from planning.safetensors_header import MAX_HEADER_BYTES, parse_header, read_header


def _write(path, header: dict, data: bytes = b"", *, pad_to: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_golden_header_bytes(tmp_path):
    path = tmp_path / "golden.safetensors"
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]},
              "__metadata__": {"format": "pt"}}
    _write(path, header, b"\x00" * 12)
    raw = json.dumps(header).encode()
    h = read_header(str(path))
    assert h.header_size == 8 + len(raw)
    assert h.metadata == {"format": "pt"}
    assert [(t.name, t.dtype, t.shape, t.start, t.end) for t in h.tensors] == [
        ("a", "float32", (2,), 8 + len(raw), 8 + len(raw) + 8),
        ("b", "bfloat16", (1, 2), 8 + len(raw) + 8, 8 + len(raw) + 12),
    ]


def test_agrees_with_safetensors_library(tmp_path):
    path = str(tmp_path / "lib.safetensors")
    tensors = {"x": torch.arange(6, dtype=torch.float16).reshape(2, 3), "y": torch.ones(4, dtype=torch.int64)}
    save_file(tensors, path)
    h = read_header(path)
    blob = open(path, "rb").read()
    for t in h.tensors:
        expected = tensors[t.name]
        got = torch.frombuffer(bytearray(blob[t.start : t.end]), dtype=expected.dtype).reshape(t.shape)
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "header, data_len, message",
    [
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "'w' ends at data byte 16 but the data section is only 8 bytes"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, 16, "'w' (F32, shape [4]) needs 16 bytes but data_offsets [0, 12] span 12"),
        ({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, 1, "'w' has unknown dtype 'Q7'"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "'w' has an invalid shape [-1]"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "tensors 'a' (bytes"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, 8, "'w' has invalid data_offsets [4]"),
    ],
)
def test_bad_entries_are_named(tmp_path, header, data_len, message):
    path = tmp_path / "bad.safetensors"
    _write(path, header, b"\x00" * data_len)
    with pytest.raises(CheckpointError) as err:
        read_header(str(path))
    assert "bad.safetensors" in str(err.value) and message in str(err.value)


def test_oversized_header_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(CheckpointError, match=f"header claims {MAX_HEADER_BYTES + 1} bytes, above the limit"):
        read_header(str(path))


def test_header_longer_than_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match=r"header claims 1000 bytes but the file is only 10 bytes"):
        read_header(str(path))


def test_not_json_and_not_object():
    with pytest.raises(CheckpointError, match="f.safetensors: header is not valid JSON"):
        parse_header(b"{nope", file="f.safetensors", file_size=100)
    with pytest.raises(CheckpointError, match="header is a JSON list, expected an object"):
        parse_header(b"[]", file="f.safetensors", file_size=100)


def test_tiny_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="file is 2 bytes, too short"):
        read_header(str(path))
