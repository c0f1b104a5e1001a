"""Offloaded inference on one GPU: meshload all-resident vs CPU-offloaded vs disk-offloaded, against accelerate's
offload (``from_pretrained(device_map="auto", max_memory=...)``) on the same model and the same GPU budget.

``python -m benchmarks.gpu_offload all --dir /tmp/l8b --budget 6GiB --out offload.json``

Writes a seeded random Llama-3.1-8B-shaped checkpoint (bf16, 16.06 GB, ``benchmarks.gpu_load.write``) if
absent; then runs each method in a fresh process (``python -m benchmarks.gpu_offload METHOD ...``), the
checkpoint's files warm in the page cache, and prints one JSON object: per method, the load seconds,
prefill seconds for the prompt, greedy decode tokens/s (``--new-tokens`` tokens, KV cache on the GPU,
one token per forward), peak GPU memory allocated (``torch.cuda.max_memory_allocated``) against the
budget, bytes kept on the GPU / in host memory / on disk, and the logits' relative error and greedy
tokens against the all-resident meshload run (the offloaded runs compute the same thing from the same
bytes: meshload's are expected bit-identical).

Methods:

- ``meshload-resident``: ``RankWorker`` (the rank class Ray wraps, in this process) with no budget;
- ``meshload-cpu``: ``max_memory={"cuda": BUDGET, "cpu": "1TiB"}`` — layers past the budget in page-locked
  host memory, streamed one layer ahead;
- ``meshload-disk``: ``max_memory={"cuda": BUDGET}`` — layers past the budget mapped from the checkpoint
  file itself, streamed one layer ahead;
- ``accelerate-cpu``: ``from_pretrained(device_map="auto", max_memory={0: BUDGET, "cpu": "1000GiB"})``;
- ``accelerate-disk``: ``from_pretrained(device_map="auto", max_memory={0: BUDGET, "cpu": "1GiB"},
  offload_folder=...)`` — what does not fit goes to disk.

``--device cpu --preset tiny --layers 8 --budget 1200KB`` runs the meshload methods on the CPU (the "device" being host memory with
a budget), as a smoke test of this script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROMPT = [1, 306, 4658, 278, 6593, 310, 2834, 338, 29871, 1048, 278, 6593, 310, 2834, 29889, 13]
METHODS = ("meshload-resident", "meshload-cpu", "meshload-disk", "accelerate-cpu", "accelerate-disk")


def _prompt(path: str):
    """``PROMPT`` (ids of a Llama-3 vocabulary), folded into the checkpoint's vocabulary (the tiny preset's is 512)."""
    import torch

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    return torch.tensor([[i % vocab for i in PROMPT]])


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak(device: str) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


def run_meshload(method: str, path: str, *, budget: str, device: str, new_tokens: int) -> dict:
    import torch

    from planning.offload import tier_bytes
    from planning.options import PlanOptions
    from planning.planner import make_plan
    from workers.sources import resolve_model
    from workers.rank_worker import RankWorker

    max_memory = {"meshload-resident": None, "meshload-cpu": {_device_key(device): budget, "cpu": "1TiB"},
                  "meshload-disk": {_device_key(device): budget}}[method]
    t0 = time.perf_counter()
    plan = make_plan(resolve_model(path), PlanOptions(tp=1, device=device, max_memory=max_memory))
    worker = RankWorker(plan, 0, device=device)
    worker.load({f.name: os.path.join(path, f.name) for f in plan.files})
    worker.finalize()
    _sync(device)
    load_s = time.perf_counter() - t0
    ip, port = worker.pick_port()
    worker.init_inference(ip, port, backend="gloo", collective_timeout_s=600)
    ids = _prompt(path)
    logits = worker.forward_step(ids)  # full prompt, no cache: the logits to compare
    t1 = time.perf_counter()
    step = worker.forward_step(ids, use_cache=True, reset_cache=True, last_only=True)
    _sync(device)
    prefill_s = time.perf_counter() - t1
    tokens, t2 = [], time.perf_counter()
    for i in range(new_tokens):
        nxt = step[:, -1].float().argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        if i + 1 < new_tokens:
            step = worker.forward_step(nxt, use_cache=True, reset_cache=False, last_only=True)
    _sync(device)
    decode_s = time.perf_counter() - t2
    rank = plan.ranks[0]
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "tokens_per_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None, "peak_gpu_bytes": _peak(device),
            "device_bytes": tier_bytes(rank, None), "cpu_bytes": tier_bytes(rank, "cpu"), "disk_bytes": tier_bytes(rank, "disk"),
            "streamed_bytes": worker.offload_stats()["streamed_bytes"], "logits": logits.float(), "tokens": tokens}


def _device_key(device: str) -> str:
    return "cuda" if device == "cuda" else "device"


def run_accelerate(method: str, path: str, *, budget: str, device: str, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if device != "cuda":
        raise SystemExit(f"{method} needs a GPU (accelerate offloads to a GPU's budget)")
    cpu = {"accelerate-cpu": "1000GiB", "accelerate-disk": "1GiB"}[method]  # accelerate parses no TiB
    folder = tempfile.mkdtemp(prefix="accelerate-offload-")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={0: budget, "cpu": cpu}, offload_folder=folder).eval()
    _sync(device)
    load_s = time.perf_counter() - t0
    placed = {}
    for where in (model.hf_device_map or {}).values():
        placed[str(where)] = placed.get(str(where), 0) + 1
    ids = _prompt(path).cuda()
    with torch.no_grad():
        logits = model(ids).logits.float().cpu()
        t1 = time.perf_counter()
        out = model(ids, use_cache=True)
        _sync(device)
        prefill_s = time.perf_counter() - t1
        cache, step = out.past_key_values, out.logits
        tokens, t2 = [], time.perf_counter()
        for i in range(new_tokens):
            nxt = step[:, -1].float().argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            if i + 1 < new_tokens:
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache, step = out.past_key_values, out.logits
        _sync(device)
        decode_s = time.perf_counter() - t2
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "tokens_per_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None, "peak_gpu_bytes": _peak(device),
            "modules_per_device": placed, "logits": logits, "tokens": tokens}


def run_one(args) -> None:
    """One method in this process; prints ``RESULT {json}`` (logits saved beside, for the comparison)."""
    fn = run_meshload if args.command.startswith("meshload") else run_accelerate
    result = fn(args.command, args.dir, budget=args.budget, device=args.device, new_tokens=args.new_tokens)
    import torch

    torch.save(result.pop("logits"), args.logits)
    print("RESULT " + json.dumps(result), flush=True)


def run_all(args) -> dict:
    import torch

    from benchmarks.gpu_load import write
    from benchmarks.gpu_methods import files_of
    from orchestrator.bench import warm

    write(args.dir, preset=args.preset, layers=args.layers, device=args.device)
    methods = [m for m in (args.methods.split(",") if args.methods else METHODS)
               if args.device == "cuda" or m.startswith("meshload")]
    results: dict = {"checkpoint": args.dir, "checkpoint_bytes": sum(os.path.getsize(f) for f in files_of(args.dir)),
                     "budget": args.budget, "device": args.device, "new_tokens": args.new_tokens, "methods": {}}
    logits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            warm(args.dir)
            out_logits = os.path.join(tmp, f"{method}.pt")
            cmd = [sys.executable, "-m", "benchmarks.gpu_offload", method, "--dir", args.dir, "--budget", args.budget,
                   "--device", args.device, "--new-tokens", str(args.new_tokens), "--logits", out_logits]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            rows = [line.split("RESULT ", 1)[1] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not rows:
                results["methods"][method] = {"error": done.stderr[-3000:]}
                continue
            row = json.loads(rows[-1])
            row["process_s"] = time.perf_counter() - t0
            logits[method] = torch.load(out_logits)
            results["methods"][method] = row
    base = results["methods"].get("meshload-resident", {})
    for method, row in results["methods"].items():
        if "error" in row or method not in logits or "meshload-resident" not in logits:
            continue
        ref = logits["meshload-resident"]
        row["logits_rel_err_vs_resident"] = ((logits[method] - ref).norm() / ref.norm()).item()
        row["logits_bit_identical_to_resident"] = bool(torch.equal(logits[method], ref))
        row["tokens_equal_to_resident"] = row["tokens"] == base.get("tokens")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["all", *METHODS])
    parser.add_argument("--dir", default="/tmp/l8b")
    parser.add_argument("--budget", default="6GiB", help="GPU budget for the offloaded methods (max_memory's device entry)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--preset", default="8b", choices=["8b", "tiny"], help="checkpoint written when --dir has none")
    parser.add_argument("--layers", type=int, default=None, help="layers of the checkpoint written (default: the preset's)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per method")
    parser.add_argument("--logits", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.command != "all":
        run_one(args)
        return
    results = run_all(args)
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
