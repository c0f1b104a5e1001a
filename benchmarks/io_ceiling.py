"""Ceilings of a GPU load on this machine, measured in the same run as the loaders they bound.

- ``h2d_pinned_gb_per_s``: page-locked host → device copies (nothing can feed the GPU faster);
- warm page cache: ``cat`` of the files, 16 threads ``preadv``-ing 8 MiB pieces, and 16 reads of 8 MiB
  in flight through io_uring (``workers.uring``), all into host memory only;
- cold: ``cat``, ``dd iflag=direct`` (bypassing the page cache), 1 and 16 threads ``preadv``-ing;
- ``import_floor_s``: a new ``python`` that imports torch and creates its CUDA context — the part of
  every loader's time from launch that no loader can remove.

``python -m benchmarks.io_ceiling DIR`` prints them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.gpu_methods import files_of

CHUNK = 8 << 20


def h2d_pinned(gib: int = 4) -> float:
    import torch

    src = torch.empty(gib << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return src.numel() / statistics.median(times) / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cat_rate(path: str) -> float:
    files = files_of(path)
    dt = _timed(lambda: subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True))
    return sum(os.path.getsize(f) for f in files) / dt / 1e9


def dd_direct_rate(path: str) -> float:
    files = files_of(path)

    def run() -> None:
        for f in files:
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M", "iflag=direct", "status=none"], check=True)

    return sum(os.path.getsize(f) for f in files) / _timed(run) / 1e9


def threads_rate(path: str, threads: int) -> float:
    jobs = []
    for f in files_of(path):
        size = os.path.getsize(f)
        jobs += [(f, off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)]
    fds = {f: os.open(f, os.O_RDONLY) for f in files_of(path)}
    buffers = [bytearray(CHUNK) for _ in range(threads)]

    def work(i: int) -> None:
        view = memoryview(buffers[i])
        for f, off, n in jobs[i::threads]:
            os.preadv(fds[f], [view[:n]], off)

    try:
        with ThreadPoolExecutor(threads) as pool:
            dt = _timed(lambda: list(pool.map(work, range(threads))))
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(n for _, _, n in jobs) / dt / 1e9


def uring_rate(path: str, depth: int = 16) -> float:
    from workers import uring
    from workers.staging import StagingBuffer

    buffers = [StagingBuffer(CHUNK, pin=False) for _ in range(depth)]
    jobs = []
    for f in files_of(path):
        size = os.path.getsize(f)
        jobs += [(f, off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)]
    fds = {f: os.open(f, os.O_RDONLY) for f in files_of(path)}
    ring = uring.Ring(2 * depth)

    def run() -> None:
        free, k, done = list(range(depth)), 0, 0
        while done < len(jobs):
            while free and k < len(jobs):
                b = free.pop()
                f, off, n = jobs[k]
                ring.read(fds[f], buffers[b].address, n, off, tag=b)
                k += 1
            for c in ring.submit_and_wait(wait_for=1):
                if c.result <= 0:
                    raise OSError(-c.result, "io_uring read failed")
                free.append(c.tag)
                done += 1

    try:
        dt = _timed(run)
    finally:
        ring.close()
        for fd in fds.values():
            os.close(fd)
    return sum(n for _, _, n in jobs) / dt / 1e9


def import_floor() -> float:
    code = "import torch; torch.cuda.init(); torch.empty(1, device='cuda')"
    return _timed(lambda: subprocess.run([sys.executable, "-c", code], check=True))


def ceilings(path: str, *, device: str, evict, warm, cold: tuple[str, ...] = ("cat", "dd_direct", "threads1", "threads16")) -> dict:
    out: dict[str, float] = {}
    if device == "cuda":
        out["h2d_pinned_gb_per_s"] = h2d_pinned()
        out["import_floor_s"] = import_floor()
    warm(path)
    out["warm_cat_gb_per_s"] = cat_rate(path)
    out["warm_threads16_gb_per_s"] = threads_rate(path, 16)
    out["warm_uring16_gb_per_s"] = uring_rate(path)
    for kind in cold:
        evict(path)
        if kind == "cat":
            out["cold_cat_gb_per_s"] = cat_rate(path)
        elif kind == "dd_direct":
            out["cold_dd_direct_gb_per_s"] = dd_direct_rate(path)
        else:
            out[f"cold_{kind}_gb_per_s"] = threads_rate(path, int(kind.removeprefix("threads")))
    return out


if __name__ == "__main__":
    from orchestrator.bench import evict, warm

    print(json.dumps(ceilings(sys.argv[1], device="cuda" if "--cuda" in sys.argv else "cpu", evict=evict, warm=warm), indent=1))
