"""The peers ``meshload bench`` measures against, each run in its own process(es).

- ``tp``: transformers' own tensor-parallel load, ``from_pretrained(..., tp_plan="auto")``, one process
  per rank under ``torchrun --nproc-per-node N`` (gloo on CPU);
- ``single``: transformers' single-process ``from_pretrained``;
- ``naive``: every rank (under ``torchrun``) reads the whole checkpoint (``safetensors.load_file``) and
  keeps its slice — what a loader without a plan does;
- ``meshload``: a new driver process (``import orchestrator``, ``ray.init`` to the running cluster,
  ``orchestrator.load``), as a user's script or ``ray job submit`` entrypoint starts.

Each rank prints one JSON line: rank, the wall-clock time it was ready (the bench subtracts its launch
time), seconds since its process started and for the load alone, peak RSS, the bytes it holds, and its
I/O counters (``/proc/self/io``). Runs in the bench's child processes (Ray only for ``meshload``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from workers.report import io_counters, process_age_s


def _result(rank: int, load_s: float, held_bytes: int, io_before: dict[str, int]) -> dict:
    """One rank's figures; I/O counters are deltas over the load (imports excluded)."""
    from workers.report import peak_rss_bytes

    after = io_counters()
    return {"rank": rank, "ready_at": time.time(), "process_s": process_age_s(), "load_s": load_s,
            "peak_rss_bytes": peak_rss_bytes(), "held_bytes": held_bytes,
            **{k: after[k] - io_before.get(k, 0) for k in after}}


def meshload_ranks(m, ready_at: float) -> list[dict]:
    """The bench's per-rank figures from a ``LoadedModel``'s report."""
    return [
        {"rank": r.rank, "ready_at": ready_at, "process_s": r.process_seconds, "load_s": r.seconds,
         "peak_rss_bytes": r.peak_rss_bytes, "held_bytes": r.param_bytes, "rchar": r.bytes_read,
         "read_bytes": r.disk_read_bytes, "needed_bytes": r.param_bytes, "plan_cached": m.plan_cached}
        for r in m.report
    ]


def run_meshload(path: str, dtype: str, tp: int, nodes: int, address: str, plan_cache: str | bool) -> list[dict]:
    import orchestrator
    from orchestrator.cluster import join

    join(address, log_to_driver=False)  # over loopback to an embedded cluster
    with orchestrator.load(path, tp=tp, nodes=nodes, dtype=dtype, progress=False, plan_cache=plan_cache) as m:
        return meshload_ranks(m, time.time())


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

    from planning.options import PlanOptions
    from planning.planner import make_plan
    from workers.sources import resolve_model

    rank = int(os.environ.get("RANK", "0"))
    io_before, t0 = io_counters(), time.perf_counter()
    plan = make_plan(resolve_model(path), PlanOptions(tp=tp, dtype=dtype))
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


def emit(result: dict) -> None:
    """One ``BENCH`` line in a single write: ranks of one ``torchrun`` share the pipe, and a write of
    at most PIPE_BUF bytes is not interleaved with another's."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), ("BENCH " + json.dumps(result) + "\n").encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["tp", "single", "naive", "meshload"])
    parser.add_argument("--path", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--address", default=None, help="meshload: the running Ray cluster")
    parser.add_argument("--plan-cache", default="off", help="meshload: plan cache folder, or 'off'")
    args = parser.parse_args()
    if args.method == "meshload":
        plan_cache = False if args.plan_cache == "off" else args.plan_cache
        for rank in run_meshload(args.path, args.dtype, args.tp, args.nodes, args.address, plan_cache):
            emit(rank)
        return
    if args.method == "tp":
        result = run_tp(args.path, args.dtype)
    elif args.method == "single":
        result = run_single(args.path, args.dtype)
    else:
        result = run_naive(args.path, args.dtype, args.tp)
    emit(result)


if __name__ == "__main__":
    main()
