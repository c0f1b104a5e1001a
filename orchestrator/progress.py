"""Progress of a load on the driver: bytes per node, readable on a terminal and in a job log.

On a terminal: one tqdm bar per node. Elsewhere (``ray job submit`` logs, CI, files): a plain line
per node every ``interval_s`` seconds and a final one, e.g.
``meshload: node 1 [ranks 2,3] read 1.2 GiB / 2.4 GiB (50%), 3 files, 410 MiB/s``.

Runs on the driver; fed by polling the ranks' ``get_progress``.
"""

from __future__ import annotations

import sys
import time

from planning.plan import LoadPlan
from planning.summary import human_bytes


class NodeProgress:
    def __init__(self, plan: LoadPlan, *, enabled: bool = True, stream=None, interval_s: float = 5.0, verb: str = "read") -> None:
        self.plan = plan
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.verb = verb
        self.t0 = time.monotonic()
        self.last_line = 0.0
        self.node_ranks = {n.node: list(n.ranks) for n in plan.nodes}
        self.node_files = {n.node: len({f for r in n.ranks for f in plan.ranks[r].files}) for n in plan.nodes}
        self.done: dict[int, int] = {}
        self.total: dict[int, int] = {}
        self.printed: dict[int, int] | None = None
        self.finished_at: dict[int, float] = {}  # when a node's bytes were all done (for its rate)
        self.bars = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bars = {
                node: tqdm(
                    total=1, unit="B", unit_scale=True, unit_divisor=1024, position=i, leave=True, file=self.stream,
                    desc=f"node {node} {self.verb}",
                )
                for i, node in enumerate(self.node_ranks)
            }

    def update(self, per_rank: dict[int, tuple[int, int]]) -> None:
        """``per_rank``: rank → (bytes done, bytes total)."""
        if not self.enabled:
            return
        for node, ranks in self.node_ranks.items():
            self.done[node] = sum(per_rank.get(r, (0, 0))[0] for r in ranks)
            self.total[node] = sum(per_rank.get(r, (0, 0))[1] for r in ranks)
            if self.total[node] and self.done[node] >= self.total[node]:
                self.finished_at.setdefault(node, time.monotonic())
        if self.bars is not None:
            for node, bar in self.bars.items():
                bar.total = max(self.total[node], 1)
                bar.n = self.done[node]
                bar.refresh()
        elif time.monotonic() - self.last_line >= self.interval_s:
            self._lines()

    def _lines(self) -> None:
        if self.printed == self.done and self.done and time.monotonic() - self.last_line < 30:
            return  # nothing new (e.g. the final poll, then close); a stalled load still prints every 30 s
        self.printed = dict(self.done)
        self.last_line = time.monotonic()
        for node, ranks in self.node_ranks.items():
            done, total = self.done.get(node, 0), self.total.get(node, 0)
            elapsed = max(self.finished_at.get(node, self.last_line) - self.t0, 1e-9)
            pct = 100.0 * done / total if total else 100.0
            print(
                f"meshload: node {node} [ranks {','.join(map(str, ranks))}] {self.verb} {human_bytes(done)} / "
                f"{human_bytes(total)} ({pct:.0f}%), {self.node_files[node]} files, {human_bytes(done / elapsed)}/s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bars is not None:
            for bar in self.bars.values():
                bar.close()
        else:
            self._lines()
