"""The peers ``meshload bench`` measures against, each run in its own process(es).

- ``tp``: transformers' own tensor-parallel load, ``from_pretrained(..., tp_plan="auto")``, one process
  per rank under ``torchrun --nproc-per-node N`` (gloo on CPU);
- ``single``: transformers' single-process ``from_pretrained``;
- ``naive``: every rank (under ``torchrun``) reads the whole checkpoint (``safetensors.load_file``) and
  keeps its slice — what a loader without a plan does.

Each process prints one JSON line: rank, seconds since the process started and for the load alone,
peak RSS, the bytes it holds, and its I/O counters (``/proc/self/io``). Runs in the bench's child
processes; no Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from workers.report import io_counters


def process_age_s() -> float:
    """Seconds since this process started (from /proc, so the interpreter's start-up counts)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _result(rank: int, load_s: float, held_bytes: int, io_before: dict[str, int]) -> dict:
    """One rank's figures; I/O counters are deltas over the load (imports excluded)."""
    from workers.report import peak_rss_bytes

    after = io_counters()
    return {"rank": rank, "ready_s": process_age_s(), "load_s": load_s, "peak_rss_bytes": peak_rss_bytes(),
            "held_bytes": held_bytes, **{k: after[k] - io_before.get(k, 0) for k in after}}


def run_tp(path: str, dtype: str) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    io_before, t0 = io_counters(), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t0
    held = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel() * local.element_size()
    return _result(dist.get_rank(), load_s, held, io_before)


def run_single(path: str, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    io_before, t0 = io_counters(), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t0
    return _result(0, load_s, sum(p.numel() * p.element_size() for p in model.parameters()), io_before)


def run_naive(path: str, dtype: str, tp: int) -> dict:
    """Read every tensor whole, then keep this rank's shard as meshload's plan cuts it."""
    import torch
    from safetensors.torch import load_file

    from planning.planner import make_plan

    rank = int(os.environ.get("RANK", "0"))
    io_before, t0 = io_counters(), time.perf_counter()
    plan = make_plan(path, tp=tp, dtype=dtype)
    full: dict[str, torch.Tensor] = {}
    for f in plan.files:
        full.update(load_file(os.path.join(plan.model.root, f.name)))
    held = {}
    for p in plan.ranks[rank].params:
        source = p.alias_of or p.name
        if source not in full or p.computed:
            continue
        t = full[source].to(getattr(torch, dtype))
        if p.shard is not None:
            t = torch.cat([t.narrow(p.shard.dim, s, n) for s, n in p.shard.pieces], dim=p.shard.dim)
        held[p.name] = t.clone()
    del full
    load_s = time.perf_counter() - t0
    return _result(rank, load_s, sum(t.numel() * t.element_size() for t in held.values()), io_before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["tp", "single", "naive"])
    parser.add_argument("--path", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    if args.method == "tp":
        result = run_tp(args.path, args.dtype)
    elif args.method == "single":
        result = run_single(args.path, args.dtype)
    else:
        result = run_naive(args.path, args.dtype, args.tp)
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
