"""Parse and validate a safetensors header without touching tensor data.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON + the data section. Planning needs
only the JSON: every tensor's dtype, shape and byte range. This module reads those few kilobytes,
bounds them before allocating anything, and checks every offset against the file size, so that a
truncated shard, an overlapping or out-of-range entry, or an oversized header is an error that
names the file and the tensor *before* any rank starts reading.

Runs on the driver (planning) and, for Hub checkpoints, on bytes fetched with an HTTP range request.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, replace

from planning.errors import CheckpointError

# safetensors' own reader refuses headers above 100 MB; so do we, before allocating the buffer.
MAX_HEADER_BYTES = 100_000_000
# A header of 100 MB holds at most about a million entries; more is a corrupt or hostile file.
MAX_TENSORS_PER_FILE = 1_000_000
MAX_DIMS = 32

# safetensors dtype → (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "C64": ("complex64", 8),
}
TORCH_DTYPE_ITEMSIZE: dict[str, int] = {name: size for name, size in DTYPES.values()}


@dataclass(frozen=True, slots=True)
class HeaderTensor:
    """One tensor entry of a safetensors header, offsets made absolute within the file."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the first element in the file
    end: int  # absolute byte offset one past the last element

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """What planning needs from one safetensors file."""

    file: str  # display name used in messages (relative path or URL)
    file_size: int
    header_size: int  # 8 + N: bytes before the data section
    metadata: dict[str, str]
    tensors: tuple[HeaderTensor, ...]
    sha256: str | None = None  # of the header's bytes (the first ``header_size`` bytes of the file), when read


def header_digest(raw: bytes) -> str:
    """The sha256 of a header's bytes (prefix and JSON): what identifies a file's layout in a plan."""
    return hashlib.sha256(raw).hexdigest()


def header_length(prefix: bytes, *, file: str, file_size: int) -> int:
    """Decode and bound the 8-byte length prefix; returns N (the JSON length)."""
    if len(prefix) < 8:
        raise CheckpointError(
            f"{file}: file is {file_size} bytes, too short for a safetensors header (needs at least 8)"
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{file}: header claims {n} bytes, above the limit of {MAX_HEADER_BYTES}; the file is corrupt or not safetensors"
        )
    if 8 + n > file_size:
        raise CheckpointError(
            f"{file}: header claims {n} bytes but the file is only {file_size} bytes (truncated file?)"
        )
    return n


def parse_header(header_json: bytes, *, file: str, file_size: int) -> SafetensorsHeader:
    """Validate the JSON part of a header and return its tensors sorted by offset.

    Checks: valid UTF-8 JSON object; bounded entry count; known dtypes; non-negative integer shapes;
    ``end - begin == numel * itemsize``; every range inside the data section; no two ranges overlap.
    """
    header_size = 8 + len(header_json)
    try:
        raw = json.loads(header_json.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: header is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: header is a JSON {type(raw).__name__}, expected an object")
    if len(raw) > MAX_TENSORS_PER_FILE:
        raise CheckpointError(f"{file}: header lists {len(raw)} entries, above the limit of {MAX_TENSORS_PER_FILE}")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{file}: __metadata__ is a {type(metadata).__name__}, expected an object")

    data_size = file_size - header_size
    tensors = []
    for name, entry in raw.items():
        tensors.append(_parse_entry(name, entry, file=file, data_size=data_size, header_size=header_size))
    tensors.sort(key=lambda t: (t.start, t.end))
    for prev, cur in zip(tensors, tensors[1:]):
        if cur.start < prev.end:
            raise CheckpointError(
                f"{file}: tensors {prev.name!r} (bytes {prev.start}-{prev.end}) and {cur.name!r} "
                f"(bytes {cur.start}-{cur.end}) overlap"
            )
    return SafetensorsHeader(
        file=file,
        file_size=file_size,
        header_size=header_size,
        metadata={str(k): str(v) for k, v in metadata.items()},
        tensors=tuple(tensors),
    )


def _parse_entry(name: str, entry: object, *, file: str, data_size: int, header_size: int) -> HeaderTensor:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{file}: entry for tensor {name!r} is not an object")
    dtype = entry.get("dtype")
    if dtype not in DTYPES:
        raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise CheckpointError(f"{file}: tensor {name!r} has an invalid shape {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise CheckpointError(f"{file}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    torch_dtype, itemsize = DTYPES[dtype]
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{file}: tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes but data_offsets "
            f"[{begin}, {end}] span {end - begin}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{file}: tensor {name!r} ends at data byte {end} but the data section is only {data_size} bytes "
            f"(file truncated or header corrupt)"
        )
    return HeaderTensor(
        name=name, dtype=torch_dtype, shape=tuple(shape), start=header_size + begin, end=header_size + end
    )


def read_header(path: str, *, display_name: str | None = None) -> SafetensorsHeader:
    """Read and validate the header of a local safetensors file (reads 8 + N bytes, never the data)."""
    name = display_name or path
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = header_length(f.read(8), file=name, file_size=file_size)
            header_json = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: file not found") from None
    if len(header_json) != n:
        raise CheckpointError(f"{name}: header claims {n} bytes but only {len(header_json)} could be read")
    header = parse_header(header_json, file=name, file_size=file_size)
    return replace(header, sha256=header_digest(struct.pack("<Q", n) + header_json))
