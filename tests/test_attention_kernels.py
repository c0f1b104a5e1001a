"""flash-attn is imported lazily, on the workers only, and a node without it fails the load before any fetch."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

import orchestrator
from tests import checkpoints
from tests.conftest import wait_until_clean
from workers.rank_worker import RankWorker


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("llama")))


@pytest.fixture
def fake_flash(tmp_path):
    """A stand-in flash-attn install (package + dist-info, as pip leaves it) that leaves a marker file when imported."""
    site = tmp_path / "site"
    pkg = site / "flash_attn"
    pkg.mkdir(parents=True)
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\n__version__ = '2.8.0'\n")
    info = site / "flash_attn-2.8.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flash-attn\nVersion: 2.8.0\n")
    (info / "top_level.txt").write_text("flash_attn\n")
    (info / "RECORD").write_text("flash_attn/__init__.py,,\n")
    return site, marker


def _plan_in_subprocess(ckpt, site, attn, device):
    code = (
        "import orchestrator\n"
        f"p = orchestrator.plan({ckpt!r}, tp=2, attn_implementation={attn!r}, device={device!r})\n"
        "print(p.attn_implementation)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_planning_never_imports_flash_attn(ckpt, fake_flash):
    site, marker = fake_flash
    out = _plan_in_subprocess(ckpt, site, "sdpa", "cpu")
    assert out.returncode == 0, out.stderr
    out = _plan_in_subprocess(ckpt, site, "flash_attention_2", "cuda")
    assert out.returncode == 0 and out.stdout.strip() == "flash_attention_2", out.stderr
    assert not marker.exists(), "flash_attn was imported at plan time"


def test_missing_flash_attn_fails_at_plan_time(ckpt):
    with pytest.raises(orchestrator.PlanError, match="flash-attn is not installed here"):
        orchestrator.plan(ckpt, tp=2, attn_implementation="flash_attention_2", device="cuda")
    with pytest.raises(orchestrator.PlanError, match="needs device='cuda'"):
        orchestrator.plan(ckpt, tp=2, attn_implementation="flash_attention_2", device="cpu")


def test_worker_check_names_the_node(ckpt, fake_flash, monkeypatch):
    plan = dataclasses.replace(orchestrator.plan(ckpt, tp=2), attn_implementation="flash_attention_2")
    worker = RankWorker(None, 1)
    with pytest.raises(orchestrator.PlanError, match=r"flash-attn is not installed on node \S+$"):
        worker.attach(plan)
    monkeypatch.syspath_prepend(str(fake_flash[0]))
    with pytest.raises(orchestrator.PlanError, match=r"flash_attention_2 needs CUDA; none on node \S+$"):
        worker.check_kernels()
    assert not fake_flash[1].exists()


@pytest.mark.cluster
def test_load_stops_before_reading_when_a_node_lacks_the_kernel(ray_cluster, ckpt):
    plan = dataclasses.replace(orchestrator.plan(ckpt, tp=2, nodes=2), attn_implementation="flash_attention_2")
    with pytest.raises(orchestrator.PlanError) as err:
        orchestrator.load(plan, progress=False)
    message = str(err.value)
    assert "[Rank 0]" in message and "[Rank 1]" in message and "flash-attn is not installed on node 127.0.0." in message
    assert wait_until_clean() == ([], [])
