"""Per-token decoding latency: meshload at tp=2 on CPU against transformers' single-process ``generate``.

Writes (once) a seeded random Llama (``orchestrator.bench.write_checkpoint``), then measures greedy
decoding of one prompt (``--prompt`` random tokens, ``--new`` tokens, stop tokens off), each way
``--repeats`` times, the median kept:

- ``transformers``: ``from_pretrained`` + ``generate`` in this process, torch using ``--threads`` threads
  (the cores the meshload ranks get together); token times from a ``BaseStreamer``;
- ``meshload-on-ranks``: ``m.stream`` at ``tp`` ranks over ``nodes`` simulated nodes (one thread each):
  the ranks decode by themselves, rank 0 streams its tokens to the driver;
- ``meshload-through-driver``: the same model, each step sent by the driver (one Ray round trip per
  token, the token chosen on the driver): how pipeline stages decode, and how every model did before.

Per-token latency is the median time between two consecutive tokens (the prompt's forward excluded);
time to first token is reported apart. Prints a table, writes ``decode-latency-<size>.json``.

Runs on the driver: ``python -m benchmarks.decode_latency [--size 250m] [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _gaps(stamps: list[float]) -> tuple[float, float]:
    """(time to first token, median time between tokens) from the start stamp and one stamp per token."""
    return stamps[1] - stamps[0], statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def run_transformers(path: str, prompt: torch.Tensor, new: int, threads: int) -> tuple[float, float, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    streamer = Stamps()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=[], pad_token_id=0, streamer=streamer)
    # the streamer's first put is the prompt (right after generate starts), then one per token
    ttft, per_token = _gaps(streamer.stamps)
    return ttft, per_token, out


def run_meshload(m, prompt: torch.Tensor, new: int, *, on_ranks: bool) -> tuple[float, float, torch.Tensor]:
    ids, mask, decoding = m._decoding_of(prompt, None, max_new_tokens=new, eos_token_id=[], pad_token_id=0,
                                         do_sample=False, seed=0)
    stamps = [time.perf_counter()]
    tokens = []
    steps = m._tokens(ids, mask, decoding) if on_ranks else m._replayed(lambda: m._decode_through_driver(ids, mask, decoding))
    for t in steps:
        stamps.append(time.perf_counter())
        tokens.append(t)
    ttft, per_token = _gaps(stamps)
    return ttft, per_token, torch.cat([prompt, torch.stack(tokens, dim=1)], dim=1)


def main(argv: list[str] | None = None) -> int:
    from orchestrator.bench import SIZES, _start_cluster, save_results, warm, write_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="250m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the transformers process")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)

    import orchestrator

    path = write_checkpoint(os.path.join(args.out, f"llama-{args.size}-{args.dtype}"), args.size, args.dtype)
    warm(path)
    prompt = torch.randint(3, SIZES[args.size]["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(0))
    results: dict[str, list[tuple[float, float]]] = {}
    outputs = {}
    for _ in range(args.repeats):
        ttft, per_token, outputs["transformers"] = run_transformers(path, prompt, args.new, args.threads)
        results.setdefault("transformers", []).append((ttft, per_token))
    cluster = _start_cluster(args)
    try:
        with orchestrator.load(path, tp=args.tp, nodes=args.nodes, progress=False) as m:
            m.logits(prompt)  # the process group is formed (not timed)
            for _ in range(args.repeats):
                for name, on_ranks in (("meshload-on-ranks", True), ("meshload-through-driver", False)):
                    ttft, per_token, outputs[name] = run_meshload(m, prompt, args.new, on_ranks=on_ranks)
                    results.setdefault(name, []).append((ttft, per_token))
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    same = {name: torch.equal(out, outputs["transformers"]) for name, out in outputs.items()}
    median = {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)) for name, runs in results.items()}
    lines = [f"{args.size} Llama, {args.dtype}, greedy, prompt {args.prompt} tokens, {args.new} new; meshload tp={args.tp} over "
             f"{args.nodes} simulated nodes (1 thread per rank), transformers {args.threads} threads; median of {args.repeats}",
             f"{'method':<24} {'ms/token':>9} {'first token ms':>15}  tokens equal transformers'"]
    for name, (ttft, per_token) in median.items():
        lines.append(f"{name:<24} {per_token * 1e3:>9.1f} {ttft * 1e3:>15.1f}  {same[name]}")
    save_results(args.out, f"decode-latency-{args.size}", {"args": vars(args), "runs": results, "median": median, "equal": same},
                 "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
