"""Where a parameter's value comes from, as a small expression over checkpoint tensors.

A converted parameter is built from checkpoint tensors by a few layout operations: stacking a list
of per-expert tensors (``Stack``), concatenating (``Cat``), taking a part of a fused tensor
(``Narrow``), and transposing (``Transpose``). The key operation is ``locate``: given a box of the
*parameter* (a rank's shard), it returns the boxes of the *checkpoint tensors* that fill it, and where
each goes. That is what lets a rank read only the bytes of its shard through a merge or a split —
rank 1 of tp=2 reads its halves of every expert's ``w1`` and ``w3``, nothing else.

``evaluate`` computes the full value from full source tensors; tests use it as the reference for
``locate`` and compare it with transformers' own conversion ops.

Pure; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from planning.boxes import Box, box_shape, full_box, intersect, replace_dim


@dataclass(frozen=True, slots=True)
class Source:
    """A checkpoint tensor, whole."""

    tensor: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class Stack:
    """``torch.stack(parts, dim)``: transformers' ``MergeModulelist``."""

    parts: tuple["Expr", ...]
    dim: int


@dataclass(frozen=True, slots=True)
class Cat:
    """``torch.cat(parts, dim)``: transformers' ``Concatenate``."""

    parts: tuple["Expr", ...]
    dim: int


@dataclass(frozen=True, slots=True)
class Narrow:
    """``part.narrow(dim, start, length)``: one output of transformers' ``Chunk``/``Split``."""

    part: "Expr"
    dim: int
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class Transpose:
    """``part.transpose(dim0, dim1)``: transformers' ``Transpose``."""

    part: "Expr"
    dim0: int
    dim1: int


Expr = Union[Source, Stack, Cat, Narrow, Transpose]


def shape_of(e: Expr) -> tuple[int, ...]:
    if isinstance(e, Source):
        return e.shape
    if isinstance(e, Stack):
        inner = shape_of(e.parts[0])
        return inner[: e.dim] + (len(e.parts),) + inner[e.dim :]
    if isinstance(e, Cat):
        shapes = [shape_of(p) for p in e.parts]
        first = shapes[0]
        return first[: e.dim] + (sum(s[e.dim] for s in shapes),) + first[e.dim + 1 :]
    if isinstance(e, Narrow):
        inner = shape_of(e.part)
        return inner[: e.dim] + (e.length,) + inner[e.dim + 1 :]
    inner = list(shape_of(e.part))
    inner[e.dim0], inner[e.dim1] = inner[e.dim1], inner[e.dim0]
    return tuple(inner)


def sources_of(e: Expr) -> list[Source]:
    if isinstance(e, Source):
        return [e]
    if isinstance(e, (Stack, Cat)):
        return [s for p in e.parts for s in sources_of(p)]
    return sources_of(e.part)


def check_expr(e: Expr, *, what: str) -> None:
    """Shapes must agree where parts meet; raises ValueError naming ``what`` otherwise."""
    if isinstance(e, Source):
        return
    if isinstance(e, (Stack, Cat)):
        for p in e.parts:
            check_expr(p, what=what)
        shapes = [shape_of(p) for p in e.parts]
        ref = shapes[0]
        for s in shapes[1:]:
            ok = s == ref if isinstance(e, Stack) else (len(s) == len(ref) and s[: e.dim] + s[e.dim + 1 :] == ref[: e.dim] + ref[e.dim + 1 :])
            if not ok:
                names = [src.tensor for src in sources_of(e)]
                raise ValueError(f"{what}: cannot {type(e).__name__.lower()} tensors of shapes {shapes} ({names[:4]}...)")
        return
    check_expr(e.part, what=what)
    inner = shape_of(e.part)
    if isinstance(e, Narrow) and not (0 <= e.start and e.start + e.length <= inner[e.dim]):
        raise ValueError(f"{what}: part [{e.start}, {e.start + e.length}) out of range for dimension {e.dim} of size {inner[e.dim]}")


@dataclass(frozen=True, slots=True)
class Fragment:
    """``out[dst_box] = src[src_box]`` rearranged: ``axes[i]`` is the source dim feeding output dim ``i``,
    or None for a size-1 dim that the source does not have (from ``Stack``)."""

    tensor: str
    src_box: Box
    dst_box: Box  # relative to the origin of the box passed to ``locate``
    axes: tuple[int | None, ...]

    @property
    def perm(self) -> tuple[int, ...]:
        return tuple(a for a in self.axes if a is not None)

    @property
    def is_permuted(self) -> bool:
        p = self.perm
        return any(a > b for a, b in zip(p, p[1:]))


def locate(e: Expr, box: Box) -> list[Fragment]:
    """The checkpoint boxes that fill ``box`` of ``e``'s value, with their place in the box."""
    if isinstance(e, Source):
        return [Fragment(e.tensor, box, full_box(box_shape(box)), tuple(range(len(box))))]
    if isinstance(e, Narrow):
        start, stop = box[e.dim]
        return locate(e.part, replace_dim(box, e.dim, (start + e.start, stop + e.start)))
    if isinstance(e, Cat):
        out, offset = [], 0
        lo, hi = box[e.dim]
        for part in e.parts:
            size = shape_of(part)[e.dim]
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                for f in locate(part, replace_dim(box, e.dim, (a - offset, b - offset))):
                    out.append(_shift(f, e.dim, a - lo))
            offset += size
        return out
    if isinstance(e, Stack):
        out = []
        lo, hi = box[e.dim]
        inner_box = box[: e.dim] + box[e.dim + 1 :]
        for i in range(lo, hi):
            for f in locate(e.parts[i], inner_box):
                dst = f.dst_box[: e.dim] + ((i - lo, i - lo + 1),) + f.dst_box[e.dim :]
                axes = f.axes[: e.dim] + (None,) + f.axes[e.dim :]
                out.append(Fragment(f.tensor, f.src_box, dst, axes))
        return out
    inner = list(box)
    inner[e.dim0], inner[e.dim1] = inner[e.dim1], inner[e.dim0]
    out = []
    for f in locate(e.part, tuple(inner)):
        dst, axes = list(f.dst_box), list(f.axes)
        dst[e.dim0], dst[e.dim1] = dst[e.dim1], dst[e.dim0]
        axes[e.dim0], axes[e.dim1] = axes[e.dim1], axes[e.dim0]
        out.append(Fragment(f.tensor, f.src_box, tuple(dst), tuple(axes)))
    return out


def _shift(f: Fragment, dim: int, delta: int) -> Fragment:
    s, t = f.dst_box[dim]
    return Fragment(f.tensor, f.src_box, replace_dim(f.dst_box, dim, (s + delta, t + delta)), f.axes)


def fragment_view(fragment: Fragment, region):
    """Rearrange a source region (a tensor of ``src_box``'s shape) into the fragment's destination shape."""
    return region.permute(fragment.perm).reshape(box_shape(fragment.dst_box))


def evaluate(e: Expr, tensors: dict):
    """The full value of ``e`` from full source tensors (reference for tests)."""
    import torch

    if isinstance(e, Source):
        return tensors[e.tensor]
    if isinstance(e, Stack):
        return torch.stack([evaluate(p, tensors) for p in e.parts], dim=e.dim)
    if isinstance(e, Cat):
        return torch.cat([evaluate(p, tensors) for p in e.parts], dim=e.dim)
    if isinstance(e, Narrow):
        return evaluate(e.part, tensors).narrow(e.dim, e.start, e.length)
    return evaluate(e.part, tensors).transpose(e.dim0, e.dim1)


def covers(box: Box, fragments: list[Fragment]) -> bool:
    """Whether the fragments' destination boxes tile ``box`` exactly (volumes add up and none overlap)."""
    from planning.boxes import box_numel

    total = sum(box_numel(f.dst_box) for f in fragments)
    if total != box_numel(box):
        return False
    boxes = sorted(f.dst_box for f in fragments)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if b[0][0] >= a[0][1]:
                break
            if intersect(a, b) is not None:
                return False
    return True
