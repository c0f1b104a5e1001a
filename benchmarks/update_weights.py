"""``update_weights`` against a fresh load of the same checkpoint: seconds, bytes, and a check.

Writes (once) two seeded random Llama checkpoints of the same shape — step 0 and step 1 of a run
(``orchestrator.bench.write_checkpoint``, seeds 0 and 1) — warms both in the page cache (a trainer has
just written the new one), starts an embedded cluster of ``--nodes`` simulated nodes and, in a driver
connected to it:

- ``update_weights``: a model loaded from step 0 (untimed) reads step 1, then step 0, ... in place
  (``--repeats`` times), as an RL loop does after each training step;
- ``load``: a fresh ``orchestrator.load`` of the same checkpoint to ready (plan cache off: the plan is
  made, as it is when each step is a new checkpoint), shut down after;
- ``load-cached-plan``: the same with the plan found in the plan cache (warmed by one untimed load).

Each update is checked against a fresh load: a digest of every tensor on every rank
(``workers.fingerprint``) must be equal. Prints a table and writes ``update-weights-<size>.json`` / ``.txt``.

Runs on the driver: ``python -m benchmarks.update_weights [--size 250m] [--tp 2] [--nodes 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def _digests(ctx) -> dict[str, int]:
    from workers.fingerprint import fingerprint

    return {name: fingerprint(t) for name, t in ctx.params.items()}


def main(argv: list[str] | None = None) -> int:
    from orchestrator.bench import SIZES, _start_cluster, save_results, warm, write_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="250m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)

    import orchestrator

    steps = [write_checkpoint(os.path.join(args.out, f"llama-{args.size}-step{i}"), args.size, args.dtype, seed=i)
             for i in range(2)]
    for path in steps:
        warm(path)
    cluster = _start_cluster(args)
    options = dict(tp=args.tp, nodes=args.nodes, progress=False)
    results: dict[str, list[float]] = {"update_weights": [], "load": [], "load-cached-plan": []}
    try:
        with tempfile.TemporaryDirectory() as plans:
            reference = {}
            for i, path in enumerate(steps):
                with orchestrator.load(path, plan_cache=plans, **options) as fresh:  # untimed: fills the plan cache
                    reference[i] = fresh.run(_digests)
            for r in range(args.repeats):
                for name, cache in (("load", False), ("load-cached-plan", plans)):
                    t0 = time.perf_counter()
                    m = orchestrator.load(steps[r % 2], plan_cache=cache, **options)
                    results[name].append(time.perf_counter() - t0)
                    m.shutdown()
            with orchestrator.load(steps[0], plan_cache=False, **options) as m:
                bytes_read = 0
                for r in range(args.repeats):
                    i = (r + 1) % 2
                    update = m.update_weights(steps[i])
                    results["update_weights"].append(update.seconds)
                    bytes_read = sum(update.bytes_read)
                    if m.run(_digests) != reference[i]:
                        raise SystemExit(f"update_weights to step {i}: the ranks' tensors differ from a fresh load's")
                param_bytes = sum(r.param_bytes for r in m.plan.ranks)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    summary = {name: statistics.median(v) for name, v in results.items()}
    lines = [f"{args.size} Llama, {args.dtype}, tp={args.tp} over {args.nodes} simulated nodes, {os.cpu_count()} CPUs; "
             f"{bytes_read / 2**30:.2f} GiB read per update ({param_bytes / 2**30:.2f} GiB of parameters); median of {args.repeats}",
             f"{'method':<18} {'seconds':>8} {'GB/s':>6}  runs"]
    for name, v in results.items():
        lines.append(f"{name:<18} {summary[name]:>8.2f} {bytes_read / summary[name] / 1e9:>6.2f}  "
                     + " ".join(f"{x:.2f}" for x in v))
    lines.append(f"update_weights vs load: {summary['load'] / summary['update_weights']:.1f}x faster; "
                 f"vs load-cached-plan: {summary['load-cached-plan'] / summary['update_weights']:.1f}x")
    save_results(args.out, f"update-weights-{args.size}", {"args": vars(args), "runs": results, "median": summary,
                                                           "bytes_read": bytes_read}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
