"""Where a new driver's time goes: its imports, ``ray.init``, and each step of ``orchestrator.load``.

Run it as its own process (that is the point: a new driver, as a script or ``ray job submit`` runs),
against a running cluster, a few times::

    python -m benchmarks.driver_phases CHECKPOINT --address HOST:PORT --tp 2 --nodes 2 --repeats 3 [--plan-cache DIR]

Each run prints seconds since the process started at each step and ``LoadedModel.timings``, the
driver's peak RSS at ready, and when torch's import (which the driver leaves until it handles tensors)
ends after ready. Every run plans unless ``--plan-cache DIR`` is given (then the first run fills it and
the next ones reuse it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def one_run(args) -> None:
    from workers.report import peak_rss_bytes, process_age_s

    marks = {}
    import orchestrator

    marks["import orchestrator"] = process_age_s()
    from orchestrator.cluster import join

    join(args.address, log_to_driver=False)  # ray.init, over loopback to an embedded cluster
    marks["ray.init"] = process_age_s()
    with orchestrator.load(args.checkpoint, tp=args.tp, pp=args.pp, nodes=args.nodes, dtype=args.dtype, progress=False,
                           plan_cache=args.plan_cache or False) as m:
        marks["ready"] = process_age_s()
        driver_rss = peak_rss_bytes() / 2**20
        steps = ", ".join(f"{k} {v:.2f}" for k, v in m.timings.items())
        cached = " (plan cached)" if m.plan_cached else ""
        # the driver imports torch with its first tensors (logits, generate), after the ranks are ready
        had_torch = "torch" in sys.modules
        import torch  # noqa: F401

        marks["torch imported" + (" (already)" if had_torch else "")] = process_age_s()
    print(" | ".join(f"{k} at {v:.2f} s" for k, v in marks.items()) + f" | driver peak RSS at ready {driver_rss:.0f} MiB"
          f" || load(){cached}: {steps}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--address", required=True, help="the running Ray cluster (host:port)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plan-cache", default=None, metavar="DIR", help="reuse plans kept in DIR (default: plan every run)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single run, in this process
    args = p.parse_args(argv)
    if args.one:
        one_run(args)
        return 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "benchmarks.driver_phases", *(argv or sys.argv[1:]), "--one"], check=True)
        print(f"  (process wall {time.perf_counter() - t0:.2f} s, shutdown and exit included)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
