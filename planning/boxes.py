"""Boxes: axis-aligned sub-blocks of a tensor, and the byte runs they occupy in a row-major layout.

Every read meshload plans is "this box of that checkpoint tensor goes to that box of this parameter".
A box is a tuple of half-open ``(start, stop)`` ranges, one per dimension. A box of a row-major tensor
is a set of equally spaced contiguous runs; ``runs()`` describes them compactly (first offset, run
length, and an (count, stride) pair per outer dimension), so that a dim-1 slice of a 16k×16k matrix is
planned as 16k runs without listing them.

Pure functions, no I/O; used by planning (byte accounting, validation) and by workers (reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Box = tuple[tuple[int, int], ...]


def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def box_numel(box: Box) -> int:
    return math.prod(stop - start for start, stop in box)


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of the same rank, or None if they do not meet (or meet in nothing)."""
    out = []
    for (a0, a1), (b0, b1) in zip(a, b, strict=True):
        lo, hi = max(a0, b0), min(a1, b1)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


def translate(box: Box, origin: tuple[int, ...], sign: int = -1) -> Box:
    """Shift ``box`` by ``sign * origin`` (default: express it relative to ``origin``)."""
    return tuple((s + sign * o, e + sign * o) for (s, e), o in zip(box, origin, strict=True))


def in_bounds(box: Box, shape: tuple[int, ...]) -> bool:
    return len(box) == len(shape) and all(0 <= s <= e <= n for (s, e), n in zip(box, shape))


def replace_dim(box: Box, dim: int, rng: tuple[int, int]) -> Box:
    return box[:dim] + (rng,) + box[dim + 1 :]


@dataclass(frozen=True, slots=True)
class Runs:
    """A box of a row-major tensor as contiguous element runs.

    Offsets are in elements from the tensor's first element. The runs are
    ``first + sum(i_k * stride_k) + [0, run)`` for every index vector ``i`` in ``outer``'s counts.
    """

    first: int
    run: int
    outer: tuple[tuple[int, int], ...]  # (count, stride) per outer dimension, outermost first

    @property
    def count(self) -> int:
        return math.prod(c for c, _ in self.outer)

    @property
    def numel(self) -> int:
        return self.count * self.run


def strides_of(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def split_dim(box: Box, *shapes: tuple[int, ...]) -> int:
    """The outermost dimension from which ``box`` is contiguous in every one of ``shapes``.

    Dimensions after it are full in all shapes; at that dimension the box may be partial. Runs then
    span that dimension's box extent times the full extents after it.
    """
    j = len(box)
    while j > 0:
        d = j - 1
        if all(box[d] == (0, s[d]) for s in shapes):
            j = d
        else:
            break
    # dims j.. are full everywhere; dim j-1 (if any) may be partial and is the run's outermost dim
    return max(j - 1, 0)


def runs(shape: tuple[int, ...], box: Box, *, split: int | None = None) -> Runs:
    """The contiguous runs of ``box`` inside a row-major tensor of ``shape``.

    ``split`` forces the run's outermost dimension (use ``split_dim`` over the source *and* destination
    shapes so that both sides see runs of the same length).
    """
    if not shape:
        return Runs(first=0, run=1, outer=())
    d = split_dim(box, shape) if split is None else split
    strides = strides_of(shape)
    first = sum(s * st for (s, _), st in zip(box, strides))
    run = math.prod(e - s for s, e in box[d:])
    outer = tuple((box[k][1] - box[k][0], strides[k]) for k in range(d))
    return Runs(first=first, run=run, outer=outer)


def byte_span(shape: tuple[int, ...], box: Box, *, itemsize: int, offset: int = 0) -> tuple[int, int]:
    """The smallest byte range (from ``offset``) holding every element of ``box`` in a row-major tensor."""
    r = runs(shape, box)
    last = r.first + sum((c - 1) * s for c, s in r.outer) + r.run
    return offset + r.first * itemsize, offset + last * itemsize


def run_offsets(r: Runs):
    """Every run's starting element offset, in order (a numpy array; imported lazily for planning)."""
    import numpy as np

    offsets = np.array([r.first], dtype=np.int64)
    for count, stride in r.outer:
        offsets = (offsets[:, None] + np.arange(count, dtype=np.int64)[None, :] * stride).reshape(-1)
    return offsets
