"""Multi-GPU tensor parallelism with NCCL: meshload's ranks against transformers' ``tp_plan="auto"``.

On one host with N GPUs: writes a seeded random Llama-3.1-8B-shaped checkpoint (bf16) if absent, takes
transformers' single-GPU logits and greedy tokens as the reference, then under ``torchrun
--nproc-per-node N``:

- ``meshload``: each process is one rank — the same ``workers.rank_worker.RankWorker`` the Ray actors
  wrap (Ray itself is not installed on the GPU machines: no network, and its wheel exceeds what can be
  carried) — planned with ``tp=N, device="cuda"``, loaded, then TP inference over NCCL
  (``init_inference``/``forward_step``, the code ``LoadedModel.logits``/``generate`` drive);
- ``transformers``: ``from_pretrained(..., tp_plan="auto")``.

Reports per rank: load seconds, peak GPU memory; logits against the single-GPU reference (bf16
tolerance) and greedy tokens. Run on the GPU machine: ``python -m benchmarks.gpu_tp all --gpus 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = [[1, 306, 4658, 278, 6593, 310, 2834, 338, 29871, 1048, 278, 6593, 310, 2834, 29889, 13]]
NEW_TOKENS = 8


def _ids():
    import torch

    return torch.tensor(PROMPT)


def reference(path: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    with torch.no_grad():
        logits = model(_ids().cuda()).logits.float().cpu()
    tokens = model.generate(_ids().cuda(), max_new_tokens=NEW_TOKENS, do_sample=False).cpu()
    torch.save({"logits": logits, "tokens": tokens}, out)


def _compare(logits, tokens, ref_path: str) -> dict:
    import torch

    ref = torch.load(ref_path)
    rel = ((logits.float() - ref["logits"]).norm() / ref["logits"].norm()).item()
    same = int((tokens == ref["tokens"]).all(dim=0).sum().item())
    return {"logits_rel_err": rel, "argmax_agree": float((logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean()),
            "tokens_equal": bool(torch.equal(tokens, ref["tokens"])), "tokens_matching_positions": same,
            "tokens": tokens.tolist(), "ref_tokens": ref["tokens"].tolist()}


def run_meshload(path: str, ref_path: str, port: int) -> dict:
    import torch
    import torch.distributed as dist

    from planning.options import PlanOptions
    from planning.planner import make_plan
    from workers.sources import resolve_model
    from workers.rank_worker import RankWorker

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

    def mark(what: str) -> None:
        print(f"[rank {rank}] {time.perf_counter() - t0:7.2f}s {what}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    plan = make_plan(resolve_model(path), PlanOptions(tp=world, device="cuda"))
    mark("planned")
    worker = RankWorker(plan, rank)
    worker.load({f.name: os.path.join(path, f.name) for f in plan.files})
    mark("read")
    report = worker.finalize()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    mark("built")
    load_peak = torch.cuda.max_memory_allocated()
    # Under torchrun, init_process_group would wait on the launcher's store instead of serving its own
    # rendezvous (under Ray, rank 0 serves it, as here once this is unset).
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    installed = worker.init_inference("127.0.0.1", port, backend="nccl", collective_timeout_s=60)
    mark("process group up")
    ids = _ids()
    logits = worker.forward_step(ids)  # full prompt, no cache: the logits to compare
    mark("forward done")
    # greedy decoding with the KV cache kept on the ranks, as LoadedModel.generate drives it
    seq = ids
    step = worker.forward_step(ids, use_cache=True, reset_cache=True, last_only=True)
    for i in range(NEW_TOKENS):
        nxt = torch.zeros(1, dtype=torch.long, device="cuda")
        if rank == 0:
            nxt[0] = step[0, -1].float().argmax()
        dist.broadcast(nxt, src=0)
        seq = torch.cat([seq, nxt.cpu()[None]], dim=1)
        if i + 1 < NEW_TOKENS:
            step = worker.forward_step(nxt.cpu()[None], use_cache=True, reset_cache=False, last_only=True)
    out = {"rank": rank, "load_s": load_s, "peak_gpu_bytes_load": load_peak, "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
           "param_bytes": report.param_bytes, "bytes_read": report.bytes_read, "collectives": len(installed)}
    if rank == 0:
        out.update(_compare(logits, seq, ref_path))
    return out


def run_transformers(path: str, ref_path: str) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.bfloat16).eval()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_allocated()
    ids = _ids().cuda()
    with torch.no_grad():
        logits = model(ids).logits
        logits = (logits.full_tensor() if hasattr(logits, "full_tensor") else logits).float().cpu()
    tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).cpu()
    out = {"rank": dist.get_rank(), "load_s": load_s, "peak_gpu_bytes_load": load_peak,
           "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    if dist.get_rank() == 0:
        out.update(_compare(logits, tokens, ref_path))
    return out


def _torchrun(method: str, args, extra: list[str]) -> list[dict]:
    cmd = ["torchrun", "--standalone", f"--nproc-per-node={args.gpus}", "-m", "benchmarks.gpu_tp", method,
           "--dir", args.dir, "--ref", args.ref, *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines() if "RESULT " in line]
    if out.returncode != 0 or len(rows) != args.gpus:
        return [{"method": method, "error": out.stderr[-4000:]}]
    for r in rows:
        r.update(method=method, wall_s=wall)
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["all", "reference", "meshload", "transformers"])
    parser.add_argument("--dir", default="/tmp/llama8b")
    parser.add_argument("--ref", default="/tmp/llama8b-reference.pt")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--port", type=int, default=29631)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.command == "reference":
        reference(args.dir, args.ref)
    elif args.command == "meshload":
        print("RESULT " + json.dumps(run_meshload(args.dir, args.ref, args.port)), flush=True)
    elif args.command == "transformers":
        print("RESULT " + json.dumps(run_transformers(args.dir, args.ref)), flush=True)
    else:
        from benchmarks.gpu_load import write

        t0 = time.perf_counter()
        write(args.dir)
        print(f"checkpoint ready in {time.perf_counter() - t0:.1f}s", flush=True)
        subprocess.run([sys.executable, "-m", "benchmarks.gpu_tp", "reference", "--dir", args.dir, "--ref", args.ref], check=True)
        results = []
        for method in ("meshload", "transformers"):
            subprocess.run(["cat", *[os.path.join(args.dir, f) for f in os.listdir(args.dir)]], stdout=subprocess.DEVNULL)
            results += _torchrun(method, args, ["--port", str(args.port)] if method == "meshload" else [])
            for r in results[-args.gpus:]:
                print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
        for r in results:
            if "error" in r:
                print(f"{r['method']}: ERROR\n{r['error'][-1500:]}")
                continue
            line = (f"{r['method']:12} rank {r['rank']}: load {r['load_s']:.2f} s, wall {r['wall_s']:.1f} s, "
                    f"GPU peak {r['peak_gpu_bytes_load'] / 2**30:.2f} GiB after load, {r['peak_gpu_bytes'] / 2**30:.2f} GiB after inference")
            if "logits_rel_err" in r:
                line += (f"; logits rel err {r['logits_rel_err']:.2e}, argmax agree {r['argmax_agree']:.3f}, "
                         f"greedy tokens equal {r['tokens_equal']}")
            print(line)


if __name__ == "__main__":
    main()
