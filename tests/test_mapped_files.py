"""A checkpoint file truncated while a rank maps it does not crash the rank (no SIGBUS).

On CPU a rank's zero-copy tensors are views of the mapped file. ``workers.file_guard`` holds a read
lease on each file a rank opens: whoever truncates the file (here: another process, as
``save_pretrained`` into the same folder would) waits until the rank's maps no longer depend on the file,
and the rank keeps the bytes it loaded. A file the rank cannot lease is not kept mapped; a file changed
while the rank was still reading it fails the load, naming it.

The rank under test runs in a child process, so that the SIGBUS this prevents would fail the test
rather than kill pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import orchestrator
import workers.rank_worker
from planning.errors import CheckpointError
from tests import checkpoints
from workers.rank_worker import RankWorker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK = r"""
import os, sys, torch
sys.path.insert(0, {repo!r})
import orchestrator
from workers.rank_worker import RankWorker
plan = orchestrator.plan({path!r}, tp=1, nodes=1)
w = RankWorker(plan, 0)
w.load({{f.name: os.path.join({path!r}, f.name) for f in plan.files}})
w.finalize()
before = {{k: v.clone() for k, v in w.local_state().items()}}
print("READY", len(w._mapped), flush=True)
sys.stdin.readline()  # the files are truncated meanwhile
after = w.local_state()
with torch.inference_mode():
    logits = w.model(torch.tensor([[1, 2, 3]])).logits
print("SAME", all(torch.equal(before[k], after[k]) for k in before), bool(torch.isfinite(logits).all()), flush=True)
"""


def test_a_file_truncated_while_mapped_keeps_the_rank_alive_and_its_weights(tmp_path):
    path = checkpoints.llama(str(tmp_path / "llama"), tied=False)
    state = checkpoints.state_of(path)
    rank = subprocess.Popen([sys.executable, "-c", RANK.format(repo=REPO, path=path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = rank.stdout.readline()
        assert line.startswith("READY"), line + rank.stderr.read()[-3000:]
        assert int(line.split()[1]) > 0, "no tensor was mapped: nothing under test"
        t0 = time.monotonic()
        for name in os.listdir(path):  # as a re-save would: every shard emptied, by another process
            if name.endswith(".safetensors"):
                with open(os.path.join(path, name), "r+b") as f:
                    f.truncate(0)
        waited = time.monotonic() - t0
        out, err = rank.communicate("go\n", timeout=120)
    finally:
        if rank.poll() is None:
            rank.kill()
    assert rank.returncode == 0, f"rank died with {rank.returncode} (-7: SIGBUS)\n{err[-3000:]}"
    assert "SAME True True" in out, out + err[-3000:]
    assert waited < 30, f"the truncations waited {waited:.1f}s for the rank"
    assert "was truncated or opened for writing; this rank keeps the" in err
    assert state  # the checkpoint was a real one


def test_a_file_that_cannot_be_leased_is_copied_not_kept_mapped(tmp_path):
    path = checkpoints.llama(str(tmp_path / "llama"), tied=False, shard=None)
    plan = orchestrator.plan(path, tp=1, nodes=1)
    paths = {f.name: os.path.join(path, f.name) for f in plan.files}
    writer = open(paths["model.safetensors"], "r+b")  # open for writing elsewhere: Linux grants no read lease
    try:
        w = RankWorker(plan, 0)
        w.load(paths)
        assert w._mapped == set()
        w.finalize()
        checkpoints.assert_state_equal(w.local_state(), {k: v for k, v in checkpoints.state_of(path).items()
                                                         if k in w.local_state()})
    finally:
        writer.close()
    w2 = RankWorker(plan, 0)
    w2.load(paths)
    assert w2._mapped, "with the file leasable, shards are mapped again"


def test_a_file_opened_for_writing_while_the_rank_reads_fails_the_load(tmp_path, monkeypatch):
    path = checkpoints.llama(str(tmp_path / "llama"), tied=False, shard=None)
    plan = orchestrator.plan(path, tp=1, nodes=1)
    paths = {f.name: os.path.join(path, f.name) for f in plan.files}
    real = workers.rank_worker.read_items

    def read_items_while_someone_writes(files, jobs, **kwargs):
        files.fd("model.safetensors")  # opened, hence leased
        subprocess.run([sys.executable, "-c", f"open({paths['model.safetensors']!r}, 'r+b').close()"], check=True, timeout=60)
        return real(files, jobs, **kwargs)

    monkeypatch.setattr(workers.rank_worker, "read_items", read_items_while_someone_writes)
    with pytest.raises(CheckpointError, match=r"rank 0: \['model.safetensors'\] truncated or opened for writing while this rank read them"):
        RankWorker(plan, 0, zero_copy=False).load(paths)
