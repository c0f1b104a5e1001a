"""The checkpoint index's types: every tensor's file, dtype, shape and byte range.

What ``planning.checkpoint`` (a local folder), ``planning.pickle_checkpoint`` (legacy ``.bin`` files)
and the Hub's index build, and what the planner and the plan read. Kept apart from the builders so
that each can import the types without importing the others.

Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one checkpoint tensor lives: ``file`` is relative to the checkpoint root."""

    name: str
    file: str
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    start: int  # absolute byte offset in ``file``
    end: int

    @property
    def itemsize(self) -> int:
        return TORCH_DTYPE_ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class CheckpointFile:
    """One file of the checkpoint. ``sha256`` is known for Hub files (LFS metadata), else None;
    ``git_sha1`` for Hub files kept in git rather than LFS (their git blob id); ``header_sha256``
    (safetensors files) is the sha256 of the file's first ``header_size`` bytes: every node checks its
    copy against it before reading (``workers.node_files``)."""

    name: str
    size: int
    header_size: int
    sha256: str | None = None
    header_sha256: str | None = None
    git_sha1: str | None = None


@dataclass(frozen=True)
class CheckpointIndex:
    """All tensors of a checkpoint. ``root`` is a local folder, or None for a Hub repo not yet fetched."""

    root: str | None
    files: tuple[CheckpointFile, ...]
    tensors: dict[str, TensorEntry] = field(repr=False)
    format: str = "safetensors"  # or "pickle"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, name: str) -> CheckpointFile:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    def dominant_float_dtype(self) -> str | None:
        """The floating dtype holding the most bytes (what ``dtype="auto"`` falls back to)."""
        by_dtype: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype.startswith(("float", "bfloat")):
                by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        return max(by_dtype, key=by_dtype.get) if by_dtype else None
