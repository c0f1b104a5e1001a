"""Every way of putting a checkpoint on one GPU that the GPU benchmark compares, each run as a user runs it.

``python -m benchmarks.gpu_methods METHOD --dir DIR --launched EPOCH [--address HOST:PORT] [--device cuda]``
runs one method in this fresh process and prints one JSON line: wall-clock marks (epoch seconds) for
the process's start, the end of its imports, the load call, the weights on the device, the model
ready and its first logits where the method gives a model; bytes the kernel read for this process
(``/proc/self/io``; for meshload's ranks, the rank process's own counters); peak memory; and a digest
of every tensor (``workers.fingerprint``), which ``benchmarks.gpu_load`` compares with the file's.

Methods: ``meshload-ray`` (a new driver against a running Ray cluster: ``orchestrator.load(...,
device="cuda")``, plans unless ``--plan-cache DIR`` holds its plan), ``meshload-embedded`` (the same
with an embedded Ray started by the load), ``meshload-worker`` (the rank class in this process, no
Ray), ``transformers`` (``from_pretrained(device_map=...)`` + one forward), ``safetensors``
(``load_file(device=...)``), ``fastsafetensors`` (no GDS), ``instanttensor`` (buffered I/O) and
``instanttensor-direct`` (its default, direct I/O), ``runai`` (Run:ai's model streamer).
"""

from __future__ import annotations

import argparse
import json
import os
import time

PROMPT = [1, 15, 27, 99, 200, 311, 4, 8]  # a fixed prompt of 8 token ids (small: valid for any test vocabulary)


def files_of(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def process_started_at() -> float:
    """This process's start, in epoch seconds (from /proc: the interpreter's own start-up counts)."""
    with open("/proc/self/stat", encoding="ascii") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat", encoding="ascii") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def io_now() -> dict[str, int]:
    out = {}
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("rchar", "read_bytes"):
                out[key] = int(value)
    return out


def peak_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def digests(tensors) -> dict[str, list]:
    from workers.fingerprint import fingerprint

    return {name: [str(t.dtype).removeprefix("torch."), list(t.shape), fingerprint(t)] for name, t in tensors}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def meshload_ray(path: str, *, device: str, address: str, plan_cache: str | None) -> dict:
    import orchestrator

    t_imported = time.time()
    with orchestrator.load(path, device=device, address=address, progress=False, plan_cache=plan_cache or False,
                           timeout_s=600) as m:
        t_ready = time.time()
        import torch

        logits = m.logits(torch.tensor([PROMPT]))
        t_logits = time.time()
        (prints,) = m._group.call("fingerprints")
        report = m.report[0]
        return {
            "t_imported": t_imported, "t_call": t_imported, "t_weights": report.weights_ready_at, "t_ready": t_ready,
            "t_logits": t_logits, "digests": {k: [d, list(s), f] for k, (d, s, f) in prints.items()},
            "read_bytes": report.disk_read_bytes, "peak_rss_bytes": report.peak_rss_bytes,
            "peak_device_bytes": report.peak_device_bytes, "plan_cached": m.plan_cached, "planned_on": m.planned_on,
            "timings": m.timings,
            "rank_process_s": report.process_seconds, "rank_import_s": report.import_seconds,
            "rank_skeleton_s": report.skeleton_seconds, "rank_build_s": report.build_seconds, "read_s": report.read_seconds, "logits_sum": float(logits.float().sum()),
        }


def meshload_worker(path: str, *, device: str) -> dict:
    import torch

    from planning.options import PlanOptions
    from planning.planner import make_plan
    from workers.sources import resolve_model
    from workers.rank_worker import RankWorker

    t_imported = time.time()
    before = io_now()
    plan = make_plan(resolve_model(path), PlanOptions(device=device))
    worker = RankWorker(plan, 0, device=device)
    t_read = time.time()
    worker.load({f.name: os.path.join(path, f.name) for f in plan.files})
    t_weights = time.time()
    read = io_now()["read_bytes"] - before["read_bytes"]
    worker.finalize()
    t_ready = time.time()
    return {"t_imported": t_imported, "t_call": t_imported, "t_weights": t_weights, "t_ready": t_ready, "read_s": t_weights - t_read,
            "digests": {k: [d, list(s), f] for k, (d, s, f) in worker.fingerprints().items()}, "read_bytes": read,
            "peak_device_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else 0}


def transformers_load(path: str, *, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    t_imported = time.time()
    before = io_now()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
    _sync(device)
    t_weights = time.time()
    read = io_now()["read_bytes"] - before["read_bytes"]
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT], device=device)).logits
    _sync(device)
    t_logits = time.time()
    return {"t_imported": t_imported, "t_call": t_imported, "t_weights": t_weights, "t_ready": t_weights, "t_logits": t_logits,
            "digests": digests(model.state_dict().items()), "read_bytes": read, "logits_sum": float(logits.float().sum())}


def peer_load(method: str, path: str, *, device: str) -> dict:
    """The loaders that return tensors (no model): safetensors, fastsafetensors, instanttensor, runai."""
    import torch

    files = files_of(path)
    if method == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader
    elif method.startswith("instanttensor"):
        from instanttensor import BackendPolicy, safe_open
    elif method == "runai":
        from runai_model_streamer import SafetensorsStreamer
    else:
        from safetensors.torch import load_file
    t_imported = time.time()
    before = io_now()
    tensors: dict = {}
    if method == "safetensors":
        for f in files:
            tensors.update(load_file(f, device=device))
    elif method == "fastsafetensors":
        loader = SafeTensorsFileLoader(pg=None, device=f"{device}:0" if device == "cuda" else device, nogds=True)
        loader.add_filenames({0: files})
        buffers = loader.copy_files_to_device()
        tensors = {k: buffers.get_tensor(k) for k in loader.get_keys()}
    elif method.startswith("instanttensor"):
        backend = None if method == "instanttensor-direct" else BackendPolicy.BUFFERED
        with safe_open(files, framework="pt", device=0, backend=backend) as f:
            tensors = dict(f.tensors())
    elif method == "runai":
        with SafetensorsStreamer() as streamer:
            streamer.stream_files(files, device=device)
            tensors = dict(streamer.get_tensors())
    else:
        raise SystemExit(f"unknown method {method}")
    _sync(device)
    t_weights = time.time()
    read = io_now()["read_bytes"] - before["read_bytes"]
    return {"t_imported": t_imported, "t_call": t_imported, "t_weights": t_weights, "t_ready": t_weights,
            "digests": digests(tensors.items()), "read_bytes": read}


def run(method: str, path: str, *, device: str, address: str | None, plan_cache: str | None) -> dict:
    if method == "meshload-ray":
        out = meshload_ray(path, device=device, address=address, plan_cache=plan_cache)
    elif method == "meshload-embedded":
        out = meshload_ray(path, device=device, address="embedded", plan_cache=plan_cache)
    elif method == "meshload-worker":
        out = meshload_worker(path, device=device)
    elif method == "transformers":
        out = transformers_load(path, device=device)
    else:
        out = peer_load(method, path, device=device)
    out.setdefault("peak_rss_bytes", peak_rss())
    if "peak_device_bytes" not in out and device == "cuda":
        import torch

        out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--launched", type=float, required=True, help="epoch seconds at which the parent launched us")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--address", default=None)
    parser.add_argument("--plan-cache", default=None)
    args = parser.parse_args()
    started = process_started_at()
    out = run(args.method, args.dir, device=args.device, address=args.address, plan_cache=args.plan_cache)
    out.update(method=args.method, t_launch=args.launched, t_process=started)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
