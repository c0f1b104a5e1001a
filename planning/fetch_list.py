"""What one node fetches of a checkpoint: whole files, or exactly the byte runs its ranks read.

The plan's ``NodePlan.fetch`` lists the files a node's ranks touch, with covering spans per read (for
a dim-1 slice, a span from the first row's slice to the last row's: nearly the whole tensor). That is
the right list of *files*, but too coarse for byte-range fetching: with ``tp`` across nodes each node
would fetch most of every row-split matrix. Here the ranges are the exact element runs the ranks'
``ReadItem``s read (the same runs ``workers.reader`` preads), plus each file's header, unioned per
file and then coalesced: two runs closer than ``max_gap_bytes`` become one request (fewer requests,
a few wasted bytes). A file whose ranges would cover at least ``whole_above`` of it is fetched whole
instead (a whole file can be verified against its sha256 and reused by any tool).

The one place that says what a node fetches: a source's node fetcher fetches these items
(``workers.sources.hub_fetcher.NodeFetcher``), and ``meshload plan``'s "per node fetches" figure is their
exact total (``planning.summary.node_read_bytes``). Pure (a function of the plan); computed where it is
needed, one node at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planning.boxes import run_offsets, runs
from planning.byte_ranges import merge_ranges
from planning.errors import PlanError
from planning.options import FETCH_MODES
from planning.plan import LoadPlan
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE

MODES = FETCH_MODES  # declared with the load's options, which check them without numpy
DEFAULT_MAX_GAP_BYTES = 1 << 20
DEFAULT_WHOLE_ABOVE = 0.9


@dataclass(frozen=True, slots=True)
class FetchItem:
    """One file a node needs: whole (``ranges`` is None) or only ``ranges`` (half-open, sorted, disjoint)."""

    file: str
    size: int
    sha256: str | None
    header_size: int
    ranges: tuple[tuple[int, int], ...] | None = None
    header_sha256: str | None = None
    git_sha1: str | None = None  # a file kept in git, not LFS: its git blob id

    def __post_init__(self) -> None:
        if self.ranges is not None:
            prev = 0
            for a, b in self.ranges:
                if not (prev <= a < b <= self.size):
                    raise PlanError(f"{self.file}: fetch range {a}-{b} is out of order or outside 0-{self.size}")
                prev = b

    @property
    def whole(self) -> bool:
        return self.ranges is None

    @property
    def nbytes(self) -> int:
        return self.size if self.ranges is None else sum(b - a for a, b in self.ranges)


def exact_runs(plan: LoadPlan, node: int) -> dict[str, np.ndarray]:
    """Per file, the ``(start, stop)`` byte runs (an ``(n, 2)`` int64 array, unsorted) the node's ranks read."""
    pieces: dict[str, list[np.ndarray]] = {}
    for rank in plan.nodes[node].ranks:
        for p in plan.ranks[rank].params:
            for item in p.reads:
                r = runs(item.src_shape, item.src_box)
                if r.numel == 0:
                    continue
                size = TORCH_DTYPE_ITEMSIZE[item.src_dtype]
                starts = item.file_offset + run_offsets(r) * size
                pieces.setdefault(item.file, []).append(np.stack([starts, starts + r.run * size], axis=1))
    return {f: np.concatenate(p) for f, p in pieces.items()}


def node_fetch_items(
    plan: LoadPlan,
    node: int,
    *,
    mode: str = "ranges",
    max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES,
    whole_above: float = DEFAULT_WHOLE_ABOVE,
) -> tuple[FetchItem, ...]:
    """What ``node`` fetches (see module docstring). ``mode``: ``"files"`` or ``"ranges"``."""
    if mode not in MODES:
        raise PlanError(f"fetch mode {mode!r}: expected one of {MODES}")
    if max_gap_bytes < 0:
        raise PlanError(f"max_gap_bytes={max_gap_bytes} must be >= 0")
    files = {f.name: f for f in plan.files}
    wanted = [ff.file for ff in plan.nodes[node].fetch]
    spans = exact_runs(plan, node) if mode == "ranges" else {}
    items = []
    for name in wanted:
        f = files[name]
        ranges = None
        if mode == "ranges":
            rows = spans.get(name, np.empty((0, 2), dtype=np.int64))
            rows = np.concatenate([rows, np.array([[0, f.header_size]], dtype=np.int64)])
            merged = merge_ranges(rows, gap=max_gap_bytes)
            if sum(b - a for a, b in merged) < whole_above * f.size:
                ranges = tuple(merged)
        items.append(FetchItem(file=name, size=f.size, sha256=f.sha256, header_size=f.header_size, ranges=ranges,
                               header_sha256=f.header_sha256, git_sha1=f.git_sha1))
    return tuple(items)
