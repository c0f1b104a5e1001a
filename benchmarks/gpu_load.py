"""The GPU load benchmark: meshload through Ray, as users run it, side by side with every peer, in one run.

``python -m benchmarks.gpu_load all --dir /tmp/l8b --out results.json [--repeats 2] [--caches warm,cold]``

Writes a seeded random Llama-3.1-8B-shaped checkpoint (bf16, 16.06 GB in 4 shards, ``save_pretrained``)
if absent; measures the machine's ceilings (``benchmarks.io_ceiling``); starts a Ray cluster for the
new-driver runs (not timed); then, for each repeat, each page-cache state and each method, launches a
fresh process (``benchmarks.gpu_methods``) and records two clocks — from the launch of the process to
the weights on the GPU, and the load call alone — plus time to first logits where the method gives a
model, the bytes the kernel read, peak host and GPU memory, and a digest of every tensor compared with
the checkpoint's own (``mismatched`` must be 0). Warm runs ``cat`` the files first; cold runs drop
them from the page cache. Prints the table of medians with ratios to the best peer; the raw results go
to ``--out``.

Methods: ``meshload-ray`` (a new driver script against the running cluster; it plans),
``meshload-ray-cached`` (the same with its plan in the plan cache), ``meshload-embedded`` (a new driver
that starts an embedded Ray), ``meshload-worker`` (the rank class in-process, no Ray), and the peers
``transformers``, ``safetensors``, ``fastsafetensors``, ``instanttensor``, ``instanttensor-direct``,
``runai``. ``checks`` (after the timed runs): tp=1 and pp=2 (two ranks sharing the GPU) through Ray,
each bit-exact, with logits and greedy tokens against transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.gpu_methods import PROMPT, files_of
from orchestrator.bench import evict, warm
from workers.preload import preload_env

LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
PEERS = ("transformers", "safetensors", "fastsafetensors", "instanttensor", "instanttensor-direct", "runai")
MESHLOAD = ("meshload-worker", "meshload-ray", "meshload-ray-cached", "meshload-embedded")
RAY_PORT = 6391
RAY_TEMP = f"/tmp/ray-gpu-load-{os.getuid()}"


def write(path: str, *, layers: int | None = None, preset: str = "8b", device: str = "cuda") -> None:
    from orchestrator.random_checkpoint import write_random_llama

    shape = {"8b": LLAMA_8B, "tiny": TINY}[preset]
    config = {**shape, **({"num_hidden_layers": layers} if layers else {}), "dtype": "bfloat16"}
    write_random_llama(path, config=config, device=device, max_shard_size="5GB" if preset == "8b" else "200KB")


def launch(method: str, path: str, *, device: str, timeout_s: float, address: str | None = None,
           plan_cache: str | None = None) -> dict:
    """Run one method in a fresh process; its marks, plus the wall time seen from here."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_methods", method.removesuffix("-cached"), "--dir", path,
           "--device", device, "--launched", repr(time.time())]
    if address:
        cmd += ["--address", address]
    if plan_cache:
        cmd += ["--plan-cache", plan_cache]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        return {"method": method, "error": f"timed out after {timeout_s:g}s: {(exc.stderr or b'')[-1500:]!r}"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"method": method, "error": (proc.stderr or proc.stdout)[-3000:]}
    out = json.loads(lines[-1][len("RESULT "):])
    out["method"] = method
    out["wall_s"] = time.time() - t0
    return out


def score(run: dict, reference: dict, nbytes: int) -> dict:
    """Seconds and rates of one run, and how many tensors differ from the checkpoint's."""
    if "error" in run:
        return run
    got = run.pop("digests")
    mismatched = sorted(k for k, v in reference.items() if got.get(k) != v)
    extra = sorted(set(got) - set(reference))
    row = {k: v for k, v in run.items() if not k.startswith("t_")}
    t = run
    row.update(
        launch_to_weights_s=t["t_weights"] - t["t_launch"],
        load_call_s=t["t_weights"] - t["t_call"],
        launch_to_ready_s=t["t_ready"] - t["t_launch"],
        imports_s=t["t_imported"] - t["t_launch"],
        gb_per_s=nbytes / max(t.get("read_s") or (t["t_weights"] - t["t_call"]), 1e-9) / 1e9,  # meshload: its reads
        mismatched=len(mismatched) + len(extra),
        mismatched_names=(mismatched + extra)[:5],
        tensors=len(got),
    )
    if "t_logits" in t:
        row["launch_to_logits_s"] = t["t_logits"] - t["t_launch"]
    return row


def reference_digests(path: str, device: str) -> dict:
    """Digests of the checkpoint's tensors as safetensors reads them (cached beside the checkpoint)."""
    cache = os.path.join(path, f"digests-{device}.json")
    if not os.path.isfile(cache):
        code = ("import json, sys; from safetensors.torch import load_file; from benchmarks.gpu_methods import digests, files_of; "
                f"d = {{}}; [d.update(digests(load_file(f, device={device!r}).items())) for f in files_of({path!r})]; "
                f"json.dump(d, open({cache!r}, 'w'))")
        subprocess.run([sys.executable, "-c", code], check=True)
    with open(cache) as f:
        return json.load(f)


def start_cluster(device: str, *, preload: bool) -> str:
    """``ray start`` a one-node cluster, as ``cluster_configs/`` do: with ``preload``, its workers import what
    a rank needs (``workers.preload``) and a first driver connects so that Ray starts its idle workers; this
    returns once they are done importing (none of it timed)."""
    gpus = ["--num-gpus=1"] if device == "cuda" else []
    env = {**os.environ, **(preload_env() if preload else {})}
    subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={RAY_PORT}", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={RAY_TEMP}", *gpus], check=True, capture_output=True, env=env)
    address = f"127.0.0.1:{RAY_PORT}"
    if preload:
        subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r}); ray.shutdown()"],
                       check=True, capture_output=True)
        print(f"idle Ray workers preloaded: {wait_for_idle_workers(expected=os.cpu_count() or 1, timeout_s=240.0)}", flush=True)
    return address


def wait_for_idle_workers(*, expected: int, timeout_s: float) -> int:
    """Wait until ``expected`` idle Ray workers (Ray starts one per CPU) exist on this machine and have
    stopped using CPU (their preloads done); how many there are."""
    def workers() -> dict[str, float]:
        out = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if not f.read().startswith(b"ray::IDLE"):  # the title Ray gives a worker with no task
                        continue
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[pid] = int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
            except OSError:
                continue
        return out

    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        now = workers()
        # an idle worker still wakes now and then (its RPC threads): under 5% of a CPU counts as done
        if len(now) >= expected and last and all(now[p] - last.get(p, 0) <= 10 for p in now):
            return len(now)
        last = now
        time.sleep(2.0)
    return len(last or {})


def stop_cluster() -> None:
    """Stop the cluster ``start_cluster`` started, and only it (``ray stop`` would stop every cluster of
    the machine's user): its processes are those naming its own temp folder."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if RAY_TEMP.encode() in f.read():
                        os.kill(int(pid), sig)
            except OSError:
                continue
        time.sleep(2.0)


def schedule(methods: list[str], caches: list[str], repeats: int, cold_methods: list[str] | None) -> list[tuple[int, str, str]]:
    """(repeat, cache, method) in the order they run: repeat by repeat, so a run cut short still has
    every column once."""
    out = []
    for repeat in range(repeats):
        for cache in caches:
            chosen = cold_methods if cache == "cold" and cold_methods else methods
            out += [(repeat, cache, m) for m in methods if m in chosen]
    return out


def run_all(path: str, *, methods: list[str], caches: list[str], repeats: int, device: str, out: str | None,
            timeout_s: float, checks: bool, cold_methods: list[str] | None = None, cold_ceilings=("cat", "threads1"),
            with_ceilings: bool = True, checks_first: bool = False, preload: bool = True) -> dict:
    from benchmarks.io_ceiling import ceilings

    nbytes = sum(os.path.getsize(f) for f in files_of(path))
    reference = reference_digests(path, device)
    results: dict = {"checkpoint": path, "bytes": nbytes, "tensors": len(reference), "device": device,
                     "machine": machine(), "preloaded_workers": preload, "runs": []}

    def save() -> None:
        if out:
            with open(out, "w") as f:
                json.dump(results, f, indent=1)

    if with_ceilings:
        results["ceilings"] = ceilings(path, device=device, evict=evict, warm=warm, cold=tuple(cold_ceilings))
        print("ceilings", json.dumps(results["ceilings"]), flush=True)
        save()
    address = None
    if any(m.startswith("meshload-ray") for m in methods) or checks:
        address = start_cluster(device, preload=preload)
    caches_root = os.path.join(os.path.dirname(os.path.abspath(path)), "meshload-plan-caches")
    filled = None  # the plan cache the last planning run filled: the cached runs reuse it
    try:
        if checks and checks_first:  # its tp=1 load plans, and leaves its plan for the cached runs
            filled = os.path.join(caches_root, "checks")
            results["checks"] = ray_checks(path, device=device, address=address, timeout_s=timeout_s, plan_cache=filled)
            print("checks", json.dumps(results["checks"]), flush=True)
            save()
        for n, (repeat, cache, method) in enumerate(schedule(methods, caches, repeats, cold_methods)):
            (evict if cache == "cold" else warm)(path)
            plan_cache = None
            if method == "meshload-ray":  # plans (an empty cache), and leaves its plan for the cached runs
                plan_cache = os.path.join(caches_root, str(n))
            elif method == "meshload-ray-cached":
                plan_cache = filled
            run = launch(method, path, device=device, timeout_s=timeout_s, address=address, plan_cache=plan_cache)
            if method == "meshload-ray" and "error" not in run:
                filled = plan_cache
            row = score(run, reference, nbytes)
            row.update(cache=cache, repeat=repeat)
            if method == "meshload-ray-cached" and "error" not in row and not row.get("plan_cached"):
                row["error"] = "the plan cache was not used"
            results["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("timings",)}), flush=True)
            save()
        if checks and not checks_first:
            results["checks"] = ray_checks(path, device=device, address=address, timeout_s=timeout_s)
            print("checks", json.dumps(results["checks"]), flush=True)
            save()
    finally:
        if address:
            stop_cluster()
    results["table"] = table(results)
    save()
    return results


CHECKS = r"""
import json, sys, torch
import orchestrator
from transformers import AutoModelForCausalLM
path, device, address, tp1_cache = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None
prompt = torch.tensor([%r])
ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
with torch.inference_mode():
    ref_logits = ref(prompt.to(device)).logits.float().cpu()
    ref_tokens = ref.generate(prompt.to(device), max_new_tokens=8, do_sample=False).cpu()
ref_state = {k: v for k, v in ref.state_dict().items()}
from workers.fingerprint import fingerprint
ref_prints = {k: fingerprint(v) for k, v in ref_state.items()}
del ref, ref_state
torch.cuda.empty_cache()
out = {}
share = {"gpus_per_rank": 0.5} if device == "cuda" else {}
for name, kw in (("tp1", dict(tp=1, pp=1, plan_cache=tp1_cache or False)), ("pp2-shared-gpu", dict(tp=1, pp=2, plan_cache=False, **share))):
    with orchestrator.load(path, device=device, address=address, progress=False, **kw) as m:
        prints = {}
        for part in m._group.call("fingerprints"):
            prints.update({k: f for k, (_, _, f) in part.items()})
        logits = m.logits(prompt).float()
        tokens = m.generate(prompt, max_new_tokens=8)
        out[name] = {"mismatched_tensors": sum(prints.get(k) != v for k, v in ref_prints.items()),
                     "logits_max_abs_diff": float((logits - ref_logits).abs().max()),
                     "logits_equal": bool(torch.equal(logits, ref_logits)),
                     "tokens_equal": bool(torch.equal(tokens.cpu(), ref_tokens)),
                     "ranks_on": sorted({r.node_ip for r in m.report}), "world_size": m.plan.world_size}
print("RESULT " + json.dumps(out))
""" % (PROMPT,)


def ray_checks(path: str, *, device: str, address: str, timeout_s: float, plan_cache: str | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHECKS, path, device, address, *([plan_cache] if plan_cache else [])],
                          capture_output=True, text=True,
                          timeout=timeout_s * 2)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-3000:]}
    return json.loads(lines[-1][len("RESULT "):])


def machine() -> dict:
    info = {"cpus": os.cpu_count()}
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    except OSError:
        info["gpu"] = None
    info["kernel"] = os.uname().release
    return info


def table(results: dict) -> dict:
    """Medians per (cache, method) and ratios to the best peer in each column (lower is better)."""
    by: dict[tuple[str, str], list[dict]] = {}
    for r in results["runs"]:
        if "error" not in r and r.get("mismatched", 1) == 0:
            by.setdefault((r["cache"], r["method"]), []).append(r)
    columns = ("launch_to_weights_s", "load_call_s", "launch_to_logits_s", "launch_to_ready_s")
    rows = {}
    for (cache, method), runs in by.items():
        rows.setdefault(cache, {})[method] = {
            c: statistics.median(r[c] for r in runs) for c in columns if all(c in r for r in runs)
        } | {"gb_per_s": statistics.median(r["gb_per_s"] for r in runs), "runs": len(runs),
             "read_bytes": max(r.get("read_bytes", 0) for r in runs), "peak_rss_bytes": max(r.get("peak_rss_bytes", 0) for r in runs)}
    for cache, methods in rows.items():
        for c in columns:
            peers = [m[c] for name, m in methods.items() if name in PEERS and c in m]
            if not peers:
                continue
            best = min(peers)
            for m in methods.values():
                if c in m:
                    m[f"{c}_vs_best_peer"] = m[c] / best
    return rows


def print_table(results: dict) -> str:
    lines = []
    ce = results.get("ceilings", {})
    lines.append("ceilings: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in ce.items()))
    for cache, methods in results.get("table", {}).items():
        lines.append(f"-- {cache} (medians; × = ratio to the best peer, lower is better)")
        lines.append(f"{'method':22} {'launch→weights':>15} {'load call':>14} {'GB/s':>6} {'launch→logits':>15} {'RSS GiB':>8}")
        for name, m in sorted(methods.items(), key=lambda kv: kv[1].get("launch_to_weights_s", 1e9)):
            def cell(c):
                if c not in m:
                    return "-"
                ratio = m.get(f"{c}_vs_best_peer")
                return f"{m[c]:.2f}" + (f" ({ratio:.2f}×)" if ratio else "")
            lines.append(f"{name:22} {cell('launch_to_weights_s'):>15} {cell('load_call_s'):>14} {m['gb_per_s']:6.1f} "
                         f"{cell('launch_to_logits_s'):>15} {m['peak_rss_bytes'] / 2**30:8.2f}")
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"ERROR {r['cache']} {r['method']}: {r['error'][-400:]}")
        elif r.get("mismatched"):
            lines.append(f"MISMATCH {r['cache']} {r['method']}: {r['mismatched']} tensors, e.g. {r['mismatched_names']}")
    if "checks" in results:
        lines.append("checks: " + json.dumps(results["checks"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["write", "all", "table"])
    parser.add_argument("--dir", default="/tmp/l8b")
    parser.add_argument("--preset", default="8b", choices=["8b", "tiny"])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--caches", default="warm,cold")
    parser.add_argument("--methods", default=",".join(MESHLOAD + PEERS))
    parser.add_argument("--cold-methods", default=None, help="a subset of --methods for the cold runs")
    parser.add_argument("--cold-ceilings", default="cat,threads1", help="of cat, dd_direct, threadsN")
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--checks-first", action="store_true", help="run the tp=1/pp=2 checks before the timed runs")
    parser.add_argument("--no-ceilings", action="store_true")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per run")
    parser.add_argument("--no-preload", action="store_true",
                        help="start the Ray cluster without preloading its workers (workers.preload)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.command == "table":
        with open(args.out) as f:
            results = json.load(f)
        results["table"] = table(results)
        print(print_table(results))
        return
    t0 = time.perf_counter()
    write(args.dir, layers=args.layers, preset=args.preset, device=args.device)
    print(f"checkpoint ready in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.command == "all":
        results = run_all(args.dir, methods=args.methods.split(","), caches=args.caches.split(","), repeats=args.repeats,
                          device=args.device, out=args.out, timeout_s=args.timeout, checks=not args.no_checks,
                          cold_methods=args.cold_methods.split(",") if args.cold_methods else None,
                          cold_ceilings=args.cold_ceilings.split(",") if args.cold_ceilings else (),
                          with_ceilings=not args.no_ceilings, checks_first=args.checks_first,
                          preload=not args.no_preload)
        print(print_table(results))


if __name__ == "__main__":
    main()
