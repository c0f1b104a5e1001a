"""A rank's cut of one parameter: the dimension it splits and the pieces it holds.

The type that planning's sharding rules (``planning.tp_styles``, ``planning.quantization``'s block
scales) produce and the plan carries (``planning.plan.ParamPlan.shard``); apart from both so that
either can use it without importing the other.

Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass

from planning.boxes import Box


@dataclass(frozen=True, slots=True)
class Shard:
    """How a rank's local tensor is cut from the full one along ``dim``."""

    dim: int
    pieces: tuple[tuple[int, int], ...]  # (start in the full tensor, length), laid end to end locally
    local_size: int  # local extent of ``dim``: sum of lengths plus zero padding
    full_size: int

    def __post_init__(self) -> None:
        held = sum(length for _, length in self.pieces)
        assert held <= self.local_size, (self, held)
        assert all(0 <= s and s + n <= self.full_size for s, n in self.pieces), self

    @property
    def padding(self) -> int:
        return self.local_size - sum(length for _, length in self.pieces)

    def local_shape(self, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        return full_shape[: self.dim] + (self.local_size,) + full_shape[self.dim + 1 :]

    def piece_boxes(self, full_shape: tuple[int, ...]) -> list[tuple[Box, Box]]:
        """``(local box, full box)`` for every piece."""
        out, at = [], 0
        base = tuple((0, n) for n in full_shape)
        for start, length in self.pieces:
            if length == 0:
                continue
            local = base[: self.dim] + ((at, at + length),) + base[self.dim + 1 :]
            full = base[: self.dim] + ((start, start + length),) + base[self.dim + 1 :]
            out.append((local, full))
            at += length
        return out
