"""``make demo``: the main job on an embedded default.

Writes a seeded random Llama checkpoint (``orchestrator.random_checkpoint``: transformers' ``save_pretrained``;
several shards, an odd vocabulary, GQA), starts an embedded Ray cluster with 2 simulated nodes, loads it with tp=2 (one
rank per node), prints the per-rank report, checks the reassembled state bit for bit against
transformers' own ``from_pretrained``, and runs a short greedy generation across the ranks.

Runs on the driver: ``python -m orchestrator.demo [--out DIR] [--tp N] [--nodes K]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


DEMO_LLAMA = dict(
    vocab_size=1001, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out/llama-demo")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    import orchestrator
    from orchestrator.random_checkpoint import write_random_llama
    from orchestrator.report_view import report_table
    from planning.summary import rank_table, totals_text

    path = write_random_llama(args.out, config=DEMO_LLAMA, dtype="float32", max_shard_size="4MB")
    plan = orchestrator.plan(path, tp=args.tp, pp=args.pp, nodes=args.nodes)
    print(totals_text(plan), "\n", rank_table(plan), sep="\n")
    print(f"\nloading on an embedded Ray cluster with {args.nodes} simulated nodes ...")
    t0 = time.perf_counter()
    with orchestrator.load(plan, address="embedded") as m:
        print(f"ready in {time.perf_counter() - t0:.1f}s (cluster start included)\n")
        print(report_table(m))
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(path)
        want = reference.state_dict()
        got = m.full_state_dict()
        same = list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
        print(f"\nfull_state_dict() equals transformers' from_pretrained state bit for bit: {'yes' if same else 'NO'}")
        prompt = torch.tensor([[1, 17, 42, 99, 7]])
        out = m.generate(prompt, max_new_tokens=8)
        ref = reference.generate(prompt, max_new_tokens=8, do_sample=False)
        print(f"greedy tokens (tp={args.tp}): {out[0].tolist()}")
        print(f"transformers generate     : {ref[0].tolist()}  {'(identical)' if torch.equal(out, ref) else '(DIFFERENT)'}")
        ok = same and torch.equal(out, ref)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
