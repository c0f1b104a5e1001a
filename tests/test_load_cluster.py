"""Sharded loads over a real 3-node Ray cluster against transformers: state bit for bit, then TP/PP
inference (logits within 1e-4, identical greedy tokens) on the same ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import orchestrator
from planning.errors import CheckpointError
from tests import checkpoints
from tests.conftest import live_actors_and_groups, wait_until_clean

pytestmark = pytest.mark.cluster
HEADER_SLACK = 64 << 10


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for tied in (True, False):
        path = checkpoints.llama(str(tmp_path_factory.mktemp(f"llama_tied{tied}")), tied=tied)
        model = checkpoints.reference(path)
        out[tied] = (path, model.state_dict(), *checkpoints.expected_outputs(model))
    return out


def _check_placement(m) -> None:
    by_node: dict[int, set[str]] = {}
    for r in m.report:
        by_node.setdefault(r.node, set()).add(r.node_id)
    assert all(len(ids) == 1 for ids in by_node.values()), by_node
    ids = [next(iter(v)) for v in by_node.values()]
    assert len(set(ids)) == m.plan.num_nodes, f"ranks not on {m.plan.num_nodes} distinct nodes: {by_node}"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("tp, pp, nodes", [(1, 1, 1), (2, 1, 2), (4, 1, 2), (1, 2, 2), (2, 2, 2), (4, 2, 3)])
def test_sharded_load_is_bit_exact_and_runs(ray_cluster, ckpts, tied, tp, pp, nodes):
    path, oracle, logits, tokens = ckpts[tied]
    with orchestrator.load(path, tp=tp, pp=pp, nodes=nodes, progress=False) as m:
        assert len(m.report) == tp * pp
        _check_placement(m)
        for r in m.report:
            assert r.bytes_read <= 1.05 * r.param_bytes + HEADER_SLACK, r
            assert r.peak_rss_bytes > 0 and r.seconds > 0
        checkpoints.assert_state_equal(m.full_state_dict(), oracle)
        checkpoints.assert_inference_matches(m, logits, tokens)
    assert wait_until_clean() == ([], [])


def test_exception_inside_with_block_cleans_up(ray_cluster, ckpts):
    path = ckpts[True][0]
    with pytest.raises(ZeroDivisionError):
        with orchestrator.load(path, tp=2, nodes=2, progress=False) as m:
            assert live_actors_and_groups()[0], "actors should be alive inside the block"
            1 / 0
    assert wait_until_clean() == ([], [])
    with pytest.raises(RuntimeError, match="shut down"):
        m.full_state_dict()


def test_file_truncated_after_planning_fails_on_the_rank_cleanly(ray_cluster, ckpts, tmp_path):
    import shutil

    from tests.security_workers import TruncatesBeforeReading

    src = ckpts[False][0]
    path = str(tmp_path / "ckpt")
    shutil.copytree(src, path)
    plan = orchestrator.plan(path, tp=2, nodes=2)
    victim = max(plan.files, key=lambda f: f.size).name
    # truncated where a rank reads it, after the driver checked the plan against the checkpoint
    with pytest.raises(CheckpointError) as err:
        orchestrator.load(plan, progress=False, worker_cls=TruncatesBeforeReading)
    assert f"{victim}: " in str(err.value) and "bytes but the plan was made from a copy of" in str(err.value)
    message = str(err.value)  # grouped: the ranks, their node and the phase
    assert re.match(r"\[Rank \d(, \d)*\] \(node 127\.0\.0\.\d(, 127\.0\.0\.\d)*\): CheckpointError: ", message) and message.endswith("[during read]"), message
    assert wait_until_clean() == ([], [])
    # truncated before the load: the driver refuses the plan before anything starts
    with pytest.raises(CheckpointError, match=rf"the plan names the checkpoint folder {path}, which cannot be resolved: {victim}: .* ends at data byte"):
        orchestrator.load(plan, progress=False)
    assert wait_until_clean() == ([], [])


def test_cli_plan_and_load(ray_cluster, ckpts, tmp_path):
    path = ckpts[True][0]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    exe = os.path.join(os.path.dirname(sys.executable), "meshload")
    out = subprocess.run([exe, "plan", path, "--tp", "2", "--pp", "2", "--nodes", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "parameters" in out.stdout and "FLOPs per token" in out.stdout and "rank  node  stage" in out.stdout
    report = tmp_path / "report.json"
    out = subprocess.run([exe, "load", path, "--tp", "2", "--nodes", "2", "--report", str(report)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert "read/params" in out.stdout and "meshload: node 1 [ranks 1] read" in out.stderr
    assert "plan reused" not in out.stdout
    again = subprocess.run([exe, "load", path, "--tp", "2", "--nodes", "2"], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr
    assert "plan reused from the plan cache (no planning)" in again.stdout and "read/params" in again.stdout
    import json

    data = json.loads(report.read_text())
    assert [r["rank"] for r in data["report"]] == [0, 1] and data["plan"]["tp"] == 2
    bad = subprocess.run([exe, "plan", path, "--tp", "3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "tp=3 does not divide num_attention_heads=4" in bad.stderr
    assert wait_until_clean() == ([], [])
