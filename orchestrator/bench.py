"""``meshload bench`` / ``make bench``: meshload against its peers, side by side in one run.

Writes (once) a seeded synthetic Llama checkpoint of the chosen size with ``save_pretrained`` —
default ~1.1B parameters in bf16, TinyLlama's shape — then measures, one after the other on the
same machine and the same warm page cache (``--repeats`` times each, the median run kept):

- ``meshload``: ``orchestrator.load`` at ``tp`` ranks over ``nodes`` simulated nodes, called in a driver
  already connected to the cluster (a Ray cluster started beforehand, not timed);
- ``meshload-new-driver``: the same load from a new driver process (imports, ``ray.init``, plan,
  load), as a script or a ``ray job submit`` entrypoint runs it the first time (plan cache off);
- ``meshload-new-driver-cached``: the same, run again: the plan comes from the plan cache (filled by
  one untimed run first), so the driver does not plan (nor import transformers' model code);
- ``transformers-tp``: transformers' own TP load (``tp_plan="auto"`` under ``torchrun --nproc-per-node tp``);
- ``transformers``: transformers' single-process ``from_pretrained``;
- ``naive``: every rank reads the whole checkpoint and slices its shard (under ``torchrun``).

Per rank: seconds to ready from the launch (``orchestrator.load`` called, or the command started —
``torchrun``'s own start included — as a user waits for it), the rank process's age at ready (its
interpreter start and imports), seconds of the load alone, bytes read (meshload: what it read; peers:
what their read calls returned — mmap readers show only on a cold cache), bytes fetched from storage on
a cold page cache (``--cold``), peak RSS, and GB/s. A table, a JSON file, and ratios of meshload
against each peer. Tests run it at a tiny size; they check that it runs, not the timings.

Runs on the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    p.add_argument("--peers", default="meshload,meshload-new-driver,meshload-new-driver-cached,transformers-tp,transformers,naive",
                   help="comma-separated subset of what to run")
    p.add_argument("--repeats", type=int, default=3, help="warm runs of each method; the median one is kept")
    p.add_argument("--cold", action="store_true", help="also measure bytes fetched from storage on a cold page cache")


def write_checkpoint(path: str, size: str, dtype: str, *, seed: int = 0) -> str:
    """A seeded random Llama of preset ``size`` (``SIZES``) in ``dtype`` (``orchestrator.random_checkpoint``)."""
    from orchestrator.random_checkpoint import write_random_llama

    config = dict(SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return write_random_llama(path, config=config, dtype=dtype, seed=seed, max_shard_size="500MB")


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


def run_meshload(path: str, *, tp: int, nodes: int, dtype: str, address: str) -> dict:
    import orchestrator
    from orchestrator.bench_peers import meshload_ranks

    launched = time.time()
    with orchestrator.load(path, tp=tp, nodes=nodes, dtype=dtype, progress=False, plan_cache=False) as m:
        ranks = meshload_ranks(m, time.time())
    return _timed(ranks, launched, wall_s=ranks[0]["ready_at"] - launched)


def _timed(ranks: list[dict], launched: float, *, wall_s: float) -> dict:
    for r in ranks:
        r["ready_s"] = r.pop("ready_at") - launched
    return {"wall_s": wall_s, "ranks": sorted(ranks, key=lambda r: r["rank"])}


def _peer(method: str, path: str, *, tp: int, nodes: int, dtype: str, address: str, plan_cache: str = "off",
          timeout_s: float = 1200.0) -> dict:
    module = [sys.executable, "-m", "orchestrator.bench_peers", method, "--path", path, "--dtype", dtype,
              "--tp", str(tp), "--nodes", str(nodes)]
    if method == "meshload":
        module += ["--address", address, "--plan-cache", plan_cache]
    if method in ("tp", "naive"):
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc-per-node={tp}", "-m", "orchestrator.bench_peers", *module[3:]]
    else:
        cmd = module
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    launched = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{method} did not finish within {timeout_s:g}s:\n{(exc.stderr or b'')[-3000:]!r}") from None
    wall = time.time() - launched
    ranks = [json.loads(line.split("BENCH ", 1)[1]) for line in out.stdout.splitlines() if "BENCH " in line]
    if out.returncode != 0 or not ranks:
        raise RuntimeError(f"{method} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return _timed(ranks, launched, wall_s=wall)


def _new_driver_cached(path: str, *, plan_cache: str, **kw) -> dict:
    if not os.listdir(plan_cache):  # one untimed run fills the cache, as a user's first run would
        _peer("meshload", path, plan_cache=plan_cache, **kw)
    result = _peer("meshload", path, plan_cache=plan_cache, **kw)
    if not all(r["plan_cached"] for r in result["ranks"]):
        raise RuntimeError(f"meshload-new-driver-cached: the plan was not reused from {plan_cache}")
    return result


METHODS = {
    "meshload": lambda path, plan_cache, **kw: run_meshload(path, **kw),  # plans every run (overlapped)
    "meshload-new-driver": lambda path, plan_cache, **kw: _peer("meshload", path, **kw),
    "meshload-new-driver-cached": _new_driver_cached,
    "transformers-tp": lambda path, plan_cache, **kw: _peer("tp", path, **kw),
    "transformers": lambda path, plan_cache, **kw: _peer("single", path, **kw),
    "naive": lambda path, plan_cache, **kw: _peer("naive", path, **kw),
}


def _median_run(runs: list[dict]) -> dict:
    """The run whose slowest rank is the median of the runs' slowest ranks; every run's figure kept."""
    ordered = sorted(runs, key=lambda r: max(x["ready_s"] for x in r["ranks"]))
    kept = dict(ordered[(len(ordered) - 1) // 2])
    kept["ready_s_runs"] = [round(max(x["ready_s"] for x in r["ranks"]), 3) for r in runs]
    return kept


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
            rows.append([name, str(rank["rank"]), f"{rank['ready_s']:.2f}", f"{rank['process_s']:.2f}", f"{rank['load_s']:.2f}",
                         _gib(rank.get("rchar", 0)), "-" if cold_bytes is None else _gib(cold_bytes),
                         _gib(rank["held_bytes"]), _gib(rank["peak_rss_bytes"]), f"{gbs:.2f}"])
    lines = [
        f"checkpoint: {results['checkpoint']['parameters'] / 1e9:.2f}B parameters, {results['checkpoint']['dtype']}, "
        f"{_gib(results['checkpoint']['bytes'])} GiB in {results['checkpoint']['files']} files; tp={results['tp']}, "
        f"nodes={results['nodes']}; median of {results['repeats']} warm run(s); machine: {results['machine']}",
        table(["method", "rank", "ready s", "process s", "load s", "read GiB", "cold disk GiB", "holds GiB",
               "peak RSS GiB", "GB/s"], rows),
        "ready s: from the launch (load() called / command started) to the rank ready; process s: the rank "
        "process's age at ready",
    ]

    def worst(name: str, key: str) -> float:
        return max(x[key] for x in results["methods"][name]["ranks"])

    ours = [n for n in ("meshload", "meshload-new-driver", "meshload-new-driver-cached") if n in results["methods"]]
    if ours:
        lines.append("")
        mine = results["methods"][ours[0]]["ranks"]
        lines.append(f"meshload: per-rank bytes read / bytes needed = {max(r['rchar'] / r['needed_bytes'] for r in mine):.3f}"
                     " (max over ranks)")
        for name in results["methods"]:
            if name in ours:
                continue
            parts = [f"per-rank peak RSS {worst(ours[0], 'peak_rss_bytes') / worst(name, 'peak_rss_bytes'):.2f}x"]
            parts += [f"time to ready ({n}) {worst(n, 'ready_s') / worst(name, 'ready_s'):.2f}x" for n in ours]
            parts.append(f"rank process age {worst(ours[0], 'process_s') / worst(name, 'process_s'):.2f}x")
            lines.append(f"meshload vs {name}: " + ", ".join(parts))
    return "\n".join(lines)


def run_bench(args) -> int:
    import platform

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(METHODS))
    if unknown:
        raise SystemExit(f"--peers: unknown {unknown}; choose from {','.join(METHODS)}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: need at least 1")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"llama-{args.size}-{args.dtype}")
    t0 = time.perf_counter()
    write_checkpoint(path, args.size, args.dtype)
    print(f"checkpoint {path} ready ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    from orchestrator import plan as make_plan

    full = make_plan(path, tp=1, dtype=args.dtype)
    results = {
        "tp": args.tp, "nodes": args.nodes, "size": args.size, "repeats": args.repeats,
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {_mem_gib()} GiB, Python {platform.python_version()}",
        "checkpoint": {"path": path, "dtype": args.dtype, "parameters": full.totals.num_parameters,
                       "bytes": full.totals.checkpoint_bytes, "files": len(full.files)},
        "methods": {}, "cold": {},
    }
    passes = [("warm", results["methods"], args.repeats)] + ([("cold", results["cold"], 1)] if args.cold else [])
    cluster = _start_cluster(args) if any(n.startswith("meshload") for n in wanted) else None
    plan_cache = os.path.join(args.out, "plan-cache")
    shutil.rmtree(plan_cache, ignore_errors=True)
    os.makedirs(plan_cache)
    options = dict(tp=args.tp, nodes=args.nodes, dtype=args.dtype, address=cluster.address if cluster else None,
                   plan_cache=plan_cache)
    try:
        for cache, into, repeats in passes:
            for name in wanted:
                runs = []
                for i in range(repeats):
                    (evict if cache == "cold" else warm)(path)
                    print(f"{cache}: {name} ({i + 1}/{repeats}) ...", file=sys.stderr, flush=True)
                    runs.append(METHODS[name](path, **options))
                into[name] = _median_run(runs)
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
    save_results(args.out, f"bench-{args.size}", results, report_text(results))
    return 0


def save_results(folder: str, stem: str, data: dict, text: str) -> None:
    """``<stem>.json`` and ``<stem>.txt`` in ``folder``; the text printed."""
    with open(os.path.join(folder, f"{stem}.json"), "w") as f:
        json.dump(data, f, indent=2)
    with open(os.path.join(folder, f"{stem}.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


def _mem_gib() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) // 2**20


def _start_cluster(args):
    from orchestrator.cluster import start_embedded

    cluster = start_embedded(args.nodes, cpus_per_node=max(1, -(-args.tp // args.nodes)))
    cluster.connect()
    return cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
