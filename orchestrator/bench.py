"""``meshload bench`` / ``make bench``: meshload against its peers, side by side in one run.

Writes (once) a seeded synthetic Llama checkpoint of the chosen size with ``save_pretrained`` —
default ~1.1B parameters in bf16, TinyLlama's shape — then measures, one after the other on the
same machine and the same warm page cache:

- meshload at ``tp`` ranks over ``nodes`` simulated nodes (a Ray cluster started beforehand, not timed);
- transformers' own TP load (``tp_plan="auto"`` under ``torchrun --nproc-per-node tp``);
- transformers' single-process ``from_pretrained``;
- a naive loader: every rank reads the whole checkpoint and slices its shard.

Per rank: seconds to ready (from process start, imports included, as a user waits for it), seconds of
the load alone, bytes read (meshload: what it read; peers: what their read calls returned — mmap
readers show only on a cold cache), bytes fetched from storage on a cold page cache (``--cold``),
peak RSS, and GB/s. A table, a JSON file, and ratios of meshload against each peer. Tests run it at a
tiny size; they check that it runs, not the timings.

Runs on the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIZES = {
    # TinyLlama-1.1B's shape
    "1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4),
    "250m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4),
    "tiny": dict(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(SIZES), default="1.1b", help="synthetic Llama size (default 1.1b)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--out", default="bench-out", help="folder for the checkpoint and results")
    p.add_argument("--peers", default="meshload,transformers-tp,transformers,naive",
                   help="comma-separated subset of what to run")
    p.add_argument("--cold", action="store_true", help="also measure bytes fetched from storage on a cold page cache")


def write_checkpoint(path: str, size: str, dtype: str, *, seed: int = 0) -> str:
    """A seeded random Llama, bf16 values drawn per tensor (no fp32 copy of the model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(marker) or os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(path, max_shard_size="500MB")
    return path


def _files(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def warm(path: str) -> None:
    for f in _files(path):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def evict(path: str) -> None:
    """Drop the checkpoint's pages from the page cache (clean pages; no privileges needed)."""
    os.sync()
    for f in _files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_meshload(path: str, *, tp: int, nodes: int, dtype: str) -> dict:
    import orchestrator
    from workers.report import peak_rss_bytes

    t0 = time.perf_counter()
    with orchestrator.load(path, tp=tp, nodes=nodes, dtype=dtype, progress=False) as m:
        ready = time.perf_counter() - t0
        ranks = [
            {"rank": r.rank, "ready_s": ready, "load_s": r.seconds, "peak_rss_bytes": r.peak_rss_bytes,
             "held_bytes": r.param_bytes, "rchar": r.bytes_read, "read_bytes": r.disk_read_bytes,
             "needed_bytes": r.param_bytes}
            for r in m.report
        ]
    return {"wall_s": ready, "ranks": ranks, "driver_peak_rss_bytes": peak_rss_bytes()}


def _peer(method: str, path: str, *, tp: int, dtype: str, timeout_s: float = 1200.0) -> dict:
    module = [sys.executable, "-m", "orchestrator.bench_peers", method, "--path", path, "--dtype", dtype, "--tp", str(tp)]
    if method in ("tp", "naive"):
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc-per-node={tp}", "-m", "orchestrator.bench_peers", *module[3:]]
    else:
        cmd = module
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{method} did not finish within {timeout_s:g}s:\n{(exc.stderr or b'')[-3000:]!r}") from None
    wall = time.perf_counter() - t0
    ranks = [json.loads(line.split("BENCH ", 1)[1]) for line in out.stdout.splitlines() if "BENCH " in line]
    if out.returncode != 0 or not ranks:
        raise RuntimeError(f"{method} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return {"wall_s": wall, "ranks": sorted(ranks, key=lambda r: r["rank"])}


PEERS = {
    "transformers-tp": lambda path, tp, dtype: _peer("tp", path, tp=tp, dtype=dtype),
    "transformers": lambda path, tp, dtype: _peer("single", path, tp=tp, dtype=dtype),
    "naive": lambda path, tp, dtype: _peer("naive", path, tp=tp, dtype=dtype),
}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def report_text(results: dict) -> str:
    from planning.summary import table

    rows = []
    for name, r in results["methods"].items():
        for rank in r["ranks"]:
            gbs = rank["held_bytes"] / rank["load_s"] / 1e9 if rank["load_s"] else 0.0
            cold = results.get("cold", {}).get(name)
            cold_bytes = next((c["read_bytes"] for c in cold["ranks"] if c["rank"] == rank["rank"]), None) if cold else None
            rows.append([name, str(rank["rank"]), f"{rank['ready_s']:.2f}", f"{rank['load_s']:.2f}",
                         _gib(rank.get("rchar", 0)), "-" if cold_bytes is None else _gib(cold_bytes),
                         _gib(rank["held_bytes"]), _gib(rank["peak_rss_bytes"]), f"{gbs:.2f}"])
    lines = [
        f"checkpoint: {results['checkpoint']['parameters'] / 1e9:.2f}B parameters, {results['checkpoint']['dtype']}, "
        f"{_gib(results['checkpoint']['bytes'])} GiB in {results['checkpoint']['files']} files; tp={results['tp']}, "
        f"nodes={results['nodes']}; machine: {results['machine']}",
        table(["method", "rank", "ready s", "load s", "read GiB", "cold disk GiB", "holds GiB", "peak RSS GiB", "GB/s"], rows),
    ]
    ours = results["methods"].get("meshload")
    if ours:
        lines.append("")
        mine_rss = max(r["peak_rss_bytes"] for r in ours["ranks"])
        mine_ready = max(r["ready_s"] for r in ours["ranks"])
        mine_read = max(r["rchar"] / r["needed_bytes"] for r in ours["ranks"])
        lines.append(f"meshload: per-rank bytes read / bytes needed = {mine_read:.3f} (max over ranks)")
        for name, r in results["methods"].items():
            if name == "meshload":
                continue
            rss = max(x["peak_rss_bytes"] for x in r["ranks"])
            ready = max(x["ready_s"] for x in r["ranks"])
            lines.append(f"meshload vs {name}: per-rank peak RSS {mine_rss / rss:.2f}x, time to ready {mine_ready / ready:.2f}x")
    return "\n".join(lines)


def run_bench(args) -> int:
    import platform

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(wanted) - {"meshload", *PEERS})
    if unknown:
        raise SystemExit(f"--peers: unknown {unknown}; choose from meshload,{','.join(PEERS)}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"llama-{args.size}-{args.dtype}")
    t0 = time.perf_counter()
    write_checkpoint(path, args.size, args.dtype)
    print(f"checkpoint {path} ready ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    from planning.planner import make_plan

    full = make_plan(path, tp=1, dtype=args.dtype)
    results = {
        "tp": args.tp, "nodes": args.nodes, "size": args.size,
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {_mem_gib()} GiB, Python {platform.python_version()}",
        "checkpoint": {"path": path, "dtype": args.dtype, "parameters": full.totals.num_parameters,
                       "bytes": full.totals.checkpoint_bytes, "files": len(full.files)},
        "methods": {}, "cold": {},
    }
    passes = [("warm", results["methods"])] + ([("cold", results["cold"])] if args.cold else [])
    cluster = _start_cluster(args) if "meshload" in wanted else None
    try:
        for cache, into in passes:
            for name in wanted:
                (evict if cache == "cold" else warm)(path)
                print(f"{cache}: {name} ...", file=sys.stderr, flush=True)
                if name == "meshload":
                    into[name] = run_meshload(path, tp=args.tp, nodes=args.nodes, dtype=args.dtype)
                else:
                    into[name] = PEERS[name](path, args.tp, args.dtype)
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
    text = report_text(results)
    with open(os.path.join(args.out, f"bench-{args.size}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, f"bench-{args.size}.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


def _mem_gib() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) // 2**20


def _start_cluster(args):
    import ray

    from orchestrator.cluster import start_embedded

    cluster = start_embedded(args.nodes, cpus_per_node=max(1, -(-args.tp // args.nodes)))
    ray.init(address=cluster.address)
    return cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
