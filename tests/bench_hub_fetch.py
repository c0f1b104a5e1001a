"""Benchmark: byte-range fetching against whole-file fetching, per node, through the real client.

Writes a seeded Llama with transformers' ``save_pretrained`` (bf16, ~0.3 GB in 100 MB shards by
default), serves it from ``tests.hub_server`` on loopback (optionally throttled: a latency per request
and a bandwidth per response, to look like a WAN), plans it for a topology, and runs each node's
``NodeFetcher`` in turn into an empty cache of its own, for whole files and for byte ranges with a few
coalescing gaps. Prints one markdown row per (topology, mode): bytes and requests per node, seconds
per node, and the bytes as a fraction of the checkpoint.

Runs on one machine, in this process (no Ray): nodes are fetched one after the other, so a row's
seconds are one node's wall time with the machine to itself.

    .venv/bin/python -m tests.bench_hub_fetch [--latency-ms 20] [--bandwidth-mbs 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def write_checkpoint(path: str, *, hidden: int, layers: int, vocab: int, shard: str) -> str:
    from orchestrator.random_checkpoint import write_random_llama

    config = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                  num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=256)
    return write_random_llama(path, config=config, max_shard_size=shard)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=256,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def run(args) -> list[str]:
    import orchestrator
    from tests.hub_server import HubServer
    from workers.sources.fetch_types import FetchOptions
    from workers.sources.hub_fetcher import NodeFetcher

    work = args.out or tempfile.mkdtemp(prefix="meshload-bench-")
    ckpt = write_checkpoint(os.path.join(work, "ckpt"), hidden=args.hidden, layers=args.layers, vocab=args.vocab, shard=args.shard)
    server = HubServer(latency_s=args.latency_ms / 1000, bandwidth=args.bandwidth_mbs * 1e6 if args.bandwidth_mbs else None)
    server.start()
    server.add_repo("bench/llama", ckpt)
    os.environ["HF_ENDPOINT"] = server.url
    rows = []
    try:
        for topo in args.topologies:
            tp, pp, nodes = (int(x) for x in topo.split(","))
            plan = orchestrator.plan("bench/llama", tp=tp, pp=pp, nodes=nodes, cache_dir=os.path.join(work, "driver"))
            total = plan.totals.checkpoint_bytes
            reads = [sum(plan.ranks[r].read_bytes for r in n.ranks) for n in plan.nodes]
            modes = [("files", None)] + [("ranges", g) for g in args.gaps]
            for mode, gap in modes:
                per_node = []
                for node in plan.nodes:
                    cache = os.path.join(work, f"cache-{node.node}")
                    shutil.rmtree(cache, ignore_errors=True)
                    server.reset_log()
                    opts = FetchOptions(mode=mode, **({"max_gap_bytes": gap} if gap is not None else {}))
                    t0 = time.perf_counter()
                    outcome = NodeFetcher(plan, node.node, cache_dir=cache, options=opts).fetch()
                    seconds = time.perf_counter() - t0
                    requests = len(server.served(lambda s: s.method == "GET" and s.status in (200, 206)))
                    per_node.append((outcome.bytes_fetched, requests, seconds))
                    shutil.rmtree(cache, ignore_errors=True)
                label = "whole files" if mode == "files" else f"ranges, gap {human(gap)}"
                rows.append(
                    f"| tp={tp} pp={pp} nodes={nodes} | {label} | "
                    + " / ".join(human(b) for b, _, _ in per_node) + " | "
                    + f"{sum(b for b, _, _ in per_node) / total:.2f} | "
                    + " / ".join(str(r) for _, r, _ in per_node) + " | "
                    + " / ".join(f"{s:.2f}" for _, _, s in per_node) + " |"
                )
                print(rows[-1], flush=True)
            print(f"  (checkpoint {human(total)}; ranks' reads per node: {' / '.join(human(r) for r in reads)})", flush=True)
    finally:
        server.stop()
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard", default="100MB")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added before every response")
    p.add_argument("--bandwidth-mbs", type=float, default=0.0, help="MB/s per response body (0: unthrottled)")
    p.add_argument("--gaps", type=lambda s: [int(x) for x in s.split(",")], default=[0, 64 << 10, 1 << 20])
    p.add_argument("--topologies", nargs="+", default=["2,1,2", "1,2,2"], help="tp,pp,nodes")
    p.add_argument("--out", default=None, help="keep the checkpoint here (reused between runs)")
    args = p.parse_args()
    print("| topology | fetch | bytes per node | total / checkpoint | GET requests per node | seconds per node |")
    print("| --- | --- | --- | --- | --- | --- |")
    run(args)


if __name__ == "__main__":
    main()
