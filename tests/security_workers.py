"""Rank workers that change a checkpoint file on their node just before reading it, for the cluster tests.

They stand for a node whose copy is not the one the plan was made from — truncated since planning, or
another checkpoint at the same path — which the driver cannot see: the rank must refuse it. Passed as
``load(..., worker_cls=...)``; importable by the rank processes (the tests folder is on their path).
"""

from __future__ import annotations

import json
import os
import struct

from workers.rank_worker import RankWorker


def flip_first_dtype(path: str) -> None:
    """Rewrite ``path``'s header in place, same length: the first F32 tensor becomes I32 (another layout)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
        flipped = header.replace(b'"F32"', b'"I32"', 1)
        assert flipped != header and len(flipped) == len(header)
        json.loads(flipped)
        f.seek(8)
        f.write(flipped)


class TruncatesBeforeReading(RankWorker):
    """Rank 1 truncates the largest checkpoint file by 200 bytes before its reads."""

    def load(self, paths, bytes_fetched=0):
        if self.rank == 1:
            name = max(self.plan.files, key=lambda f: f.size).name
            with open(paths[name], "r+b") as f:
                f.truncate(os.fstat(f.fileno()).st_size - 200)
        return super().load(paths, bytes_fetched)


class RewritesAHeaderBeforeReading(RankWorker):
    """Rank 1 turns the first file it reads into another checkpoint's (same size, another header)."""

    def load(self, paths, bytes_fetched=0):
        if self.rank == 1:
            flip_first_dtype(paths[self.rank_plan.files[0]])
        return super().load(paths, bytes_fetched)


def recording_fetcher_class(base: type) -> type:
    """``base`` (the fetch stage's actor class), recording what its constructor was given (``repr`` of the
    arguments) in ``<cache>/constructor-args-<node>``: what Ray keeps in its control store for the actor."""

    class RecordingFetcher(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            with open(os.path.join(self.root, f"constructor-args-{self.node}"), "w", encoding="utf-8") as f:
                f.write(repr((args, kwargs)))

    return RecordingFetcher
