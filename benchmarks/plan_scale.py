"""Planning at scale: how long a Llama-3.1-405B-shaped plan over 16 nodes × 8 ranks takes, and its memory.

Writes the checkpoint as real safetensors headers over sparse files (``benchmarks.sparse_checkpoint``:
~810 GB apparent, megabytes on disk), then plans it with ``orchestrator.plan(path, tp=8, pp=16,
nodes=16)`` in a fresh process, imports included, and prints the wall time and peak RSS against the
targets (10 s, 1.5 GB). A figure, not a test: a busy machine slows it down; ``tests/test_plan_scale.py``
checks what the plan holds (and the memory target) with the same measurement::

    python -m benchmarks.plan_scale [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from benchmarks.sparse_checkpoint import LLAMA_405B, write_sparse_checkpoint

TARGET_SECONDS = 10.0
TARGET_RSS_BYTES = 1.5e9

_PLAN_IN_A_NEW_PROCESS = """
import json, time
t0 = time.perf_counter()
import orchestrator
from workers.report import peak_rss_bytes
plan = orchestrator.plan({path!r}, tp=8, pp=16, nodes=16)
print(json.dumps({{"seconds": time.perf_counter() - t0, "rss": peak_rss_bytes(), "ranks": len(plan.ranks),
                   "params": plan.totals.num_parameters, "max_rank": max(r.param_bytes for r in plan.ranks),
                   "min_rank": min(r.param_bytes for r in plan.ranks), "total": plan.totals.param_bytes,
                   "nodes": [len(n.ranks) for n in plan.nodes]}}))
"""


def write_checkpoint(folder: str) -> str:
    return write_sparse_checkpoint(folder, LLAMA_405B)


def measure(path: str) -> dict:
    """Plan the checkpoint at ``path`` in a new process: seconds (imports included), peak RSS, and what the
    plan holds (ranks, parameters, per-rank bytes, ranks per node)."""
    out = subprocess.run([sys.executable, "-c", _PLAN_IN_A_NEW_PROCESS.format(path=path)], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"planning the 405B checkpoint failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write the sparse checkpoint (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = measure(write_checkpoint(f"{tmp}/llama-405b"))
    print(f"405B plan over {r['ranks']} ranks: {r['seconds']:.2f} s (imports included; target {TARGET_SECONDS:g} s), "
          f"peak RSS {r['rss'] / 2**30:.2f} GiB (target {TARGET_RSS_BYTES / 1e9:g} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
