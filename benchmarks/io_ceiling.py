"""Ceilings of the host side of a GPU load: page-cache read rate by thread count, into page-locked or
pageable memory, and the cost of page-locking memory. Run on the GPU machine over a warm file.

``python -m benchmarks.io_ceiling FILE``
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def read_rate(path: str, threads: int, chunk: int, *, pinned: bool) -> float:
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=pinned) for _ in range(threads)]
    views = [memoryview(b.numpy()) for b in bufs]
    offsets = list(range(0, size - chunk, chunk))

    def work(i: int) -> None:
        view = views[i]
        for off in offsets[i::threads]:
            os.preadv(fd, [view], off)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    dt = time.perf_counter() - t0
    os.close(fd)
    return len(offsets) * chunk / dt / 1e9


def pin_cost(gib: float) -> float:
    t0 = time.perf_counter()
    torch.empty(int(gib * 2**30), dtype=torch.uint8, pin_memory=True)
    return (time.perf_counter() - t0) / gib


if __name__ == "__main__":
    path = sys.argv[1]
    torch.cuda.init()
    print(f"pin cost: {pin_cost(0.5):.3f} s/GiB (0.5 GiB), {pin_cost(2):.3f} s/GiB (2 GiB)")
    for pinned in (True, False):
        for threads in (1, 4, 8, 16):
            for chunk in (8 << 20, 32 << 20):
                r = read_rate(path, threads, chunk, pinned=pinned)
                print(f"{'pinned ' if pinned else 'pageable'} threads={threads:2} chunk={chunk >> 20:3} MiB: {r:6.2f} GB/s")
