"""Byte-range arithmetic: the sorted union of half-open ranges (joining those close together), and the
parts of some ranges not covered by others.

One implementation for everything that merges ranges: a node's fetch list in the plan
(``planning.plan``), the exact runs a node fetches (``planning.fetch_list``, up to millions of rows, hence
numpy) and the pieces a part file holds (``workers.sources.part_store``). Pure.
"""

from __future__ import annotations


def merge_ranges(ranges, *, gap: int = 0) -> list[tuple[int, int]]:
    """Sorted union of half-open ``(start, stop)`` ranges (a list of pairs, or an ``(n, 2)`` integer array);
    ranges at most ``gap`` bytes apart are joined (the gap included)."""
    import numpy as np

    spans = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0:
        return []
    order = np.argsort(spans[:, 0], kind="stable")
    starts, stops = spans[order, 0], spans[order, 1]
    reach = np.maximum.accumulate(stops)
    new_group = np.empty(len(starts), dtype=bool)
    new_group[0] = True
    new_group[1:] = starts[1:] > reach[:-1] + gap
    first = np.flatnonzero(new_group)
    last = np.append(first[1:], len(starts)) - 1
    return [(int(a), int(b)) for a, b in zip(starts[first], reach[last])]


def subtract_ranges(needed, present) -> list[tuple[int, int]]:
    """The parts of ``needed`` not covered by ``present`` (both lists of half-open ranges)."""
    have = merge_ranges(list(present))
    out = []
    for a, b in merge_ranges(list(needed)):
        pos = a
        for c, d in have:
            if d <= pos or c >= b:
                continue
            if c > pos:
                out.append((pos, c))
            pos = max(pos, d)
            if pos >= b:
                break
        if pos < b:
            out.append((pos, b))
    return out
