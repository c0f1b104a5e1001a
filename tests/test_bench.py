"""`meshload bench` runs end to end at a tiny size (every peer, warm and cold, one run each) and writes
its table and JSON; timings are not asserted (they are measured on purpose, in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.destructive  # starts its own embedded cluster


def test_bench_runs_at_a_tiny_size(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "meshload")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([exe, "bench", "--size", "tiny", "--out", str(tmp_path), "--cold", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "bench-tiny.json").read_text())
    methods = {"meshload", "meshload-new-driver", "meshload-new-driver-cached", "transformers-tp", "transformers", "naive"}
    assert set(results["methods"]) == set(results["cold"]) == methods
    for name, r in results["methods"].items():
        expected_ranks = 1 if name == "transformers" else 2
        assert [x["rank"] for x in r["ranks"]] == list(range(expected_ranks)), name
        assert len(r["ready_s_runs"]) == 1, name
        # from the launch, the rank's own process start and imports included
        assert all(x["peak_rss_bytes"] > 0 and x["ready_s"] >= x["process_s"] - 0.5 and x["process_s"] > 0.5 for x in r["ranks"]), r
    # each rank read its bytes, no more (a vocab-padding row is held but not read)
    for name in ("meshload", "meshload-new-driver", "meshload-new-driver-cached"):
        ours = results["methods"][name]["ranks"]
        assert all(0.95 * x["needed_bytes"] <= x["rchar"] <= x["needed_bytes"] for x in ours), ours
        # only the cached method's driver skipped planning
        assert all(x["plan_cached"] == name.endswith("-cached") for x in ours), (name, ours)
    assert len(os.listdir(tmp_path / "plan-cache")) == 1
    assert "meshload vs transformers-tp: per-rank peak RSS" in out.stdout
