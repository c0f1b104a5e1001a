"""A rank lost during inference — between calls, during a ``generate`` step, while the process group is
formed — is restored: only its shard is read again, the process group is formed again, the call runs
again, and the caller gets the tokens (and logits, bit for bit) a run without the fault gives. A rank
that keeps dying ends in a clear error naming it, its node and the phase, with nothing left."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import orchestrator
import orchestrator.loaded_model
from orchestrator.rank_group import RankError
from tests import checkpoints, fault_workers
from tests.conftest import wait_until_clean

pytestmark = pytest.mark.cluster

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)
    logits, tokens = checkpoints.expected_outputs(checkpoints.reference(path), max_new_tokens=NEW_TOKENS)
    return path, logits, tokens


@pytest.fixture(autouse=True)
def _short_grace(monkeypatch):
    """Ranks blocked behind a dead peer (a rendezvous waits for it) count as stuck after 5 s, not 15."""
    monkeypatch.setattr(orchestrator.loaded_model, "INFLIGHT_GRACE_S", 5.0)


def test_rank_killed_during_a_generate_step_is_restored_and_tokens_are_unchanged(ray_cluster, ckpt, tmp_path):
    path, logits, tokens = ckpt
    # tp=2: rank 1 dies in its third forward step — the second decode step of the generation — while
    # rank 0 runs the same step and waits for it in a collective
    worker = fault_workers.killed_in("inference", str(tmp_path), victim=1, step=2)
    with orchestrator.load(path, tp=2, nodes=2, worker_cls=worker, progress=False) as m:
        before = list(m.report)
        generated = m.generate(checkpoints.PROMPT, max_new_tokens=NEW_TOKENS)
        assert os.listdir(tmp_path) == ["inference-rank1-0"]  # it really died, once
        assert torch.equal(generated, tokens), (generated, tokens)
        assert [r.restarts for r in m.report] == [0, 1]
        assert m.report[0] == before[0]  # rank 0 kept its state: nothing read again
        assert m.report[1].bytes_read == m.plan.ranks[1].read_bytes  # rank 1 read its own bytes, once more
        checkpoints.assert_inference_matches(m, logits, tokens)
    assert wait_until_clean() == ([], [])


def test_rank_killed_between_calls_is_restored_and_logits_are_bit_identical(ray_cluster, ckpt, tmp_path):
    path, logits, tokens = ckpt
    with orchestrator.load(path, tp=2, nodes=2, worker_cls=fault_workers.records_pid(str(tmp_path)), progress=False) as m:
        first = m.logits(checkpoints.PROMPT)
        with open(tmp_path / "pid-0") as f:
            os.kill(int(f.read()), signal.SIGKILL)  # rank 0: it also hosts the process group's rendezvous
        again = m.logits(checkpoints.PROMPT)
        assert torch.equal(again, first)  # the same bytes, the same computation
        assert [r.restarts for r in m.report] == [1, 0]
        assert torch.equal(m.generate(checkpoints.PROMPT, max_new_tokens=NEW_TOKENS), tokens)
    assert wait_until_clean() == ([], [])


def test_rank_killed_while_the_process_group_is_formed_is_restored(ray_cluster, ckpt, tmp_path):
    path, logits, tokens = ckpt
    # rank 1 dies before joining; rank 0, waiting for it at the rendezvous, is stuck and restored too
    worker = fault_workers.killed_in("process group", str(tmp_path), victim=1)
    with orchestrator.load(path, tp=2, nodes=2, worker_cls=worker, progress=False) as m:
        checkpoints.assert_inference_matches(m, logits, tokens)
        assert os.listdir(tmp_path) == ["process-group-rank1-0"]
        assert m.report[1].restarts == 1
    assert wait_until_clean() == ([], [])


def test_rank_that_keeps_dying_during_inference_is_a_clear_error(ray_cluster, ckpt, tmp_path):
    path, _, _ = ckpt
    worker = fault_workers.killed_in("inference", str(tmp_path), victim=1, times=10)
    m = orchestrator.load(path, tp=2, nodes=2, worker_cls=worker, max_restarts=1, progress=False)
    with pytest.raises(RankError, match=r"rank 1 \(node 127\.0\.0\.\d\) died 2 times during inference; giving up after 1 restart"):
        m.logits(checkpoints.PROMPT)
    assert len(os.listdir(tmp_path)) == 2
    assert not m.alive
    assert wait_until_clean() == ([], [])


def test_a_rank_killed_mid_stream_is_restored_and_the_stream_goes_on(ray_cluster, ckpt, tmp_path):
    """TP rank 1 dies in its fourth forward step of a sampled generation decoded on the ranks: the ranks are
    restored, the generation replays from the prompt with the same seed, and the stream goes on where it
    was — the tokens are transformers' under that seed."""
    from tests.test_decoding import MASK, PADDED, SAMPLING, transformers_generate

    path, _, _ = ckpt
    want = transformers_generate(checkpoints.reference(path), PADDED, seed=5, attention_mask=MASK, max_new_tokens=6, **SAMPLING)
    worker = fault_workers.killed_in("inference", str(tmp_path), victim=1, step=3)
    with orchestrator.load(path, tp=2, nodes=2, worker_cls=worker, progress=False) as m:
        steps = list(m.stream(PADDED, attention_mask=MASK, max_new_tokens=6, seed=5, **SAMPLING))
        assert os.listdir(tmp_path) == ["inference-rank1-0"]
        assert [r.restarts for r in m.report] == [0, 1]
        assert torch.equal(torch.cat([PADDED, torch.stack(steps, dim=1)], dim=1), want)
    assert wait_until_clean() == ([], [])
