"""``generate`` and ``stream``: greedy and sampled decoding equal to transformers' ``generate`` (sampling
under the same seed), batches of left-padded prompts, stop tokens, streaming and leaving a stream
early — decoded on the ranks at tp=2 (one stage) and through the driver at pp=2."""

from __future__ import annotations

import pytest
import torch

import orchestrator
from tests import checkpoints
from tests.conftest import wait_until_clean

pytestmark = pytest.mark.cluster

PADDED = torch.tensor([[1, 5, 9, 33, 77, 100, 3, 4], [0, 0, 0, 7, 8, 60, 61, 62], [0, 0, 0, 0, 0, 0, 44, 45]])
MASK = (torch.arange(8)[None, :] >= torch.tensor([[0], [3], [6]])).long()
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)


@pytest.fixture(scope="module")
def reference(ckpt):
    return checkpoints.reference(ckpt)


def transformers_generate(model, ids, *, seed: int = 0, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, **kwargs)


@pytest.fixture(scope="module", params=[dict(tp=2), dict(pp=2)], ids=["tp2-on-ranks", "pp2-through-driver"])
def model(request, ray_cluster, ckpt):
    with orchestrator.load(ckpt, nodes=2, progress=False, **request.param) as m:
        yield m
    assert wait_until_clean() == ([], [])


def test_greedy_batch_of_prompts_of_different_lengths(model, reference):
    want = transformers_generate(reference, PADDED, attention_mask=MASK, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(PADDED, attention_mask=MASK, max_new_tokens=6), want)


@pytest.mark.parametrize("seed", [0, 7])
def test_sampling_equals_transformers_under_the_same_seed(model, reference, seed):
    want = transformers_generate(reference, PADDED, seed=seed, attention_mask=MASK, max_new_tokens=8, **SAMPLING)
    got = model.generate(PADDED, attention_mask=MASK, max_new_tokens=8, seed=seed, **SAMPLING)
    assert torch.equal(got, want), (got, want)
    assert torch.equal(model.generate(PADDED, attention_mask=MASK, max_new_tokens=8, seed=seed, **SAMPLING), got)  # run to run


def test_sampling_draws_differ_with_the_seed(model):
    runs = {tuple(model.generate(checkpoints.PROMPT, max_new_tokens=8, seed=s, do_sample=True).flatten().tolist())
            for s in range(4)}
    assert len(runs) > 1


def test_stop_tokens(model, reference):
    free = transformers_generate(reference, PADDED, attention_mask=MASK, max_new_tokens=6, do_sample=False, eos_token_id=[])
    stops = [int(free[0, 8 + 1]), int(free[2, 8 + 3])]  # sequence 0 stops after 2 tokens, sequence 2 after 4
    want = transformers_generate(reference, PADDED, attention_mask=MASK, max_new_tokens=6, do_sample=False,
                                 eos_token_id=stops, pad_token_id=0)
    got = model.generate(PADDED, attention_mask=MASK, max_new_tokens=6, eos_token_id=stops, pad_token_id=0)
    assert torch.equal(got, want), (got, want)
    assert int(got[0, -1]) == 0  # padded after its stop token


def test_stream_yields_each_step_and_can_be_left_early(model, reference):
    want = model.generate(PADDED, attention_mask=MASK, max_new_tokens=6, seed=3, **SAMPLING)
    steps = list(model.stream(PADDED, attention_mask=MASK, max_new_tokens=6, seed=3, **SAMPLING))
    assert [tuple(s.shape) for s in steps] == [(3,)] * 6
    assert torch.equal(torch.stack(steps, dim=1), want[:, 8:])
    stream = model.stream(PADDED, attention_mask=MASK, max_new_tokens=60, eos_token_id=[], seed=3, **SAMPLING)
    first = [next(stream), next(stream)]
    with pytest.raises(RuntimeError, match="a stream of this model is still open"):
        model.logits(PADDED)
    stream.close()  # the ranks stop after their current step
    assert torch.equal(torch.stack(first, dim=1), want[:, 8:10])
    assert model.alive
    assert torch.equal(model.generate(PADDED, attention_mask=MASK, max_new_tokens=6, seed=3, **SAMPLING), want)


def test_bad_decoding_arguments(model):
    with pytest.raises(ValueError, match=r"attention_mask rows \[0\]: prompts must be left-padded"):
        model.generate(PADDED[:1], attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="pass do_sample=True"):
        model.generate(PADDED, attention_mask=MASK, temperature=0.5)
    with pytest.raises(ValueError, match=r"top_p=1\.5 must lie in \(0, 1\]"):
        model.stream(PADDED, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match=r"stop/pad token ids \[101\] lie outside the vocabulary \[0, 101\)"):
        model.generate(PADDED, eos_token_id=101)
    assert model.alive
