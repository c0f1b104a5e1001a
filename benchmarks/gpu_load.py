"""GPU load benchmark: meshload's CUDA path against transformers and safetensors, warm and cold page cache.

Writes a seeded random Llama-3.1-8B-shaped checkpoint (bf16, ~16 GB, ``save_pretrained``) if absent,
then, each in a fresh process so peak memory is its own:

- ``meshload``: plan (headers) + one ``RankWorker`` on ``cuda`` (parallel preads into page-locked
  staging buffers, asynchronous host-to-device copies), then a bit-exact check against safetensors;
- ``transformers``: ``from_pretrained(dtype=bfloat16, device_map="cuda")``;
- ``safetensors``: ``load_file(shard, device="cuda")`` for every shard;

plus the machine's page-locked host-to-device bandwidth and ``cat``'s cold read rate of the files.
Seconds are measured inside each process from the first call to "weights on the GPU" (imports excluded
for everyone). Cold runs drop the files from the page cache first.

Run on a GPU machine: ``python -m benchmarks.gpu_load all --dir /tmp/ckpt --out results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from orchestrator.bench import evict

LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
)


def shard_files(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def write(path: str, *, layers: int | None = None) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return
    config = LlamaConfig(**{**LLAMA_8B, **({"num_hidden_layers": layers} if layers else {})}, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(path, max_shard_size="5GB")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_method(method: str, path: str, threads: int, staging_mb: int = 32) -> dict:
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")  # CUDA context outside the timed region, for every method
    import transformers.models.llama.modeling_llama  # noqa: F401 - module imports outside the timed region too

    if method == "meshload":
        from planning.planner import make_plan
        from workers.rank_worker import RankWorker

        t0 = time.perf_counter()
        plan = make_plan(path, device="cuda")
        t_plan = time.perf_counter()
        worker = RankWorker(plan, 0, io_threads=threads, staging_bytes=staging_mb << 20)
        if os.environ.get("MESHLOAD_PROFILE"):
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        worker.load({f.name: os.path.join(path, f.name) for f in plan.files})
        t_load = time.perf_counter()
        report = worker.finalize()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if os.environ.get("MESHLOAD_PROFILE"):
            profiler.disable()
            profiler.dump_stats(os.environ["MESHLOAD_PROFILE"])
        peak_gpu = torch.cuda.max_memory_allocated()
        from safetensors.torch import load_file

        mismatched = 0
        for f in shard_files(path):
            for name, t in load_file(f, device="cuda").items():
                mismatched += not torch.equal(worker.tensors[name], t)
        extra = {"bytes_read": report.bytes_read, "param_bytes": report.param_bytes, "mismatched_tensors": mismatched,
                 "plan_s": t_plan - t0, "read_s": t_load - t_plan, "finalize_s": seconds - (t_load - t0),
                 "peak_gpu_bytes": peak_gpu}
    elif method == "transformers":
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        extra = {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    elif method == "safetensors":
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        tensors = [load_file(f, device="cuda") for f in shard_files(path)]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        extra = {"param_bytes": sum(t.numel() * t.element_size() for d in tensors for t in d.values())}
    else:
        raise SystemExit(f"unknown method {method}")
    total = sum(os.path.getsize(f) for f in shard_files(path))
    return {"method": method, "seconds": seconds, "gb_per_s": total / seconds / 1e9, "peak_rss_bytes": _peak_rss(),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(), **extra}  # extra's peak_gpu_bytes wins for meshload


def h2d_bandwidth(gib: int = 4) -> float:
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


def cat_rate(path: str) -> float:
    evict(path)
    files = shard_files(path)
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return sum(os.path.getsize(f) for f in files) / (time.perf_counter() - t0) / 1e9


def _child(method: str, path: str, threads: int, staging_mb: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_load", "run", method, "--dir", path, "--threads", str(threads),
                          "--staging-mb", str(staging_mb)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"method": method, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_all(path: str, threads: int, repeats: int, staging_mb: int, *, caches=("warm", "cold"),
            methods=("meshload", "transformers", "safetensors")) -> dict:
    results = {"h2d_pinned_gb_per_s": h2d_bandwidth(), "cat_cold_gb_per_s": cat_rate(path), "runs": []}
    for cache in caches:
        for method in methods:
            for i in range(repeats):
                if cache == "cold":
                    evict(path)
                else:
                    subprocess.run(["cat", *shard_files(path)], stdout=subprocess.DEVNULL, check=True)
                r = _child(method, path, threads, staging_mb)
                r.update(cache=cache, repeat=i)
                results["runs"].append(r)
                print(json.dumps(r), flush=True)
    return results


def summarize(results: dict) -> str:
    lines = [f"pinned host-to-device: {results['h2d_pinned_gb_per_s']:.1f} GB/s; cat cold: {results['cat_cold_gb_per_s']:.2f} GB/s"]
    best: dict[tuple[str, str], dict] = {}
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"{r['cache']} {r['method']}: ERROR {r['error'][-300:]}")
            continue
        key = (r["cache"], r["method"])
        if key not in best or r["seconds"] < best[key]["seconds"]:
            best[key] = r
    for cache in ("warm", "cold"):
        ref = best.get((cache, "transformers"))
        for method in ("meshload", "transformers", "safetensors"):
            r = best.get((cache, method))
            if r:
                ratio = f"{ref['seconds'] / r['seconds']:.2f}x vs transformers" if ref else ""
                lines.append(f"{cache:4} {method:12} {r['seconds']:6.2f} s {r['gb_per_s']:6.2f} GB/s "
                             f"rss {r['peak_rss_bytes'] / 2**30:5.1f} GiB gpu {r['peak_gpu_bytes'] / 2**30:5.1f} GiB {ratio}"
                             + (f" mismatched={r['mismatched_tensors']}" if "mismatched_tensors" in r else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["write", "run", "all"])
    parser.add_argument("method", nargs="?")
    parser.add_argument("--dir", default="/tmp/llama8b")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--staging-mb", type=int, default=32)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--caches", default="warm,cold")
    parser.add_argument("--methods", default="meshload,transformers,safetensors")
    args = parser.parse_args()
    if args.command == "write":
        write(args.dir, layers=args.layers)
    elif args.command == "run":
        print(json.dumps(run_method(args.method, args.dir, args.threads, args.staging_mb)))
    else:
        t0 = time.perf_counter()
        write(args.dir, layers=args.layers)
        print(f"checkpoint ready in {time.perf_counter() - t0:.1f}s", flush=True)
        results = run_all(args.dir, args.threads, args.repeats, args.staging_mb,
                          caches=args.caches.split(","), methods=args.methods.split(","))
        text = summarize(results)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
        print(text)


if __name__ == "__main__":
    main()
