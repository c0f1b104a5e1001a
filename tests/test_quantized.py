"""Pre-quantized checkpoints (FP8 with 128×128 block scales, the DeepSeek-V3/Qwen3 layout), checked against
the checkpoint's own bytes and against transformers: the planner cuts each weight and its scales on block
boundaries (or refuses the degree), ranks read only their bytes of both, the module is transformers'
``FP8Linear`` (``FP8Experts`` for a Qwen3-MoE whose experts are stored one by one), and with ``dequantize``
the state and logits are transformers' own CPU load, bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import FineGrainedFP8Config

import orchestrator
from planning.errors import ConfigError, PlanError
from planning.plan_json import plan_from_json, plan_to_json
from tests import checkpoints
from tests.conftest import wait_until_clean

BLOCK = 128


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """The FP8 checkpoint, its tensors as stored, and transformers' CPU load of it (dequantized, as it loads FP8 on CPU)."""
    path = checkpoints.fp8_llama(str(tmp_path_factory.mktemp("fp8_llama")))
    stored = {}
    for f in checkpoints.files_of(path):
        stored.update(load_file(os.path.join(path, f)))
    model = checkpoints.reference(path, quantization_config=FineGrainedFP8Config(dequantize=True))
    return path, stored, model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)  # float8 tensors compared byte for byte


def assert_raw_equal(got: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(stored), sorted(set(got) ^ set(stored))
    bad = [k for k in stored if got[k].dtype != stored[k].dtype or not torch.equal(_bits(got[k]), _bits(stored[k]))]
    assert not bad, bad


def test_the_checkpoint_is_laid_out_as_published(fp8):
    path, stored, _ = fp8
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["quantization_config"]["weight_block_size"] == [BLOCK, BLOCK]
    q = stored["model.layers.0.mlp.gate_proj.weight"]
    s = stored["model.layers.0.mlp.gate_proj.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (q.shape[0] // BLOCK, q.shape[1] // BLOCK)
    assert stored["lm_head.weight"].dtype == torch.bfloat16  # transformers keeps the LM head unquantized


def test_scales_are_cut_with_their_weight_block_by_block(fp8):
    path, stored, _ = fp8
    plan = orchestrator.plan(path, tp=2)  # q/o/gate/up/down split in 128-row (or column) blocks, one KV head replicated
    assert plan.quantization.method == "fp8" and plan.quantization.block == (BLOCK, BLOCK)
    scales = [n for n in stored if n.endswith(".weight_scale_inv")]
    assert scales
    for rank in plan.ranks:
        params = {p.name: p for p in rank.params}
        for name in scales:
            weight, scale = params[name.removesuffix("_scale_inv")], params[name]
            assert weight.dtype == "float8_e4m3fn" and scale.dtype == "float32"
            if weight.shard is None:
                assert scale.shard is None and scale.shape == tuple(stored[name].shape)
                continue
            assert scale.shard.dim == weight.shard.dim
            assert scale.shard.pieces == tuple((a // BLOCK, n // BLOCK) for a, n in weight.shard.pieces), name
            (read,) = scale.reads
            assert read.tensor == name and read.src_box[weight.shard.dim] == (
                weight.shard.pieces[0][0] // BLOCK, (weight.shard.pieces[0][0] + weight.shard.pieces[0][1]) // BLOCK)
    # Every rank reads only its bytes: exactly its local tensor, and the ranks' distinct pieces tile the checkpoint's.
    for name in [n for s in scales for n in (s, s.removesuffix("_scale_inv"))]:
        pieces = set()
        for rank in plan.ranks:
            p = next(p for p in rank.params if p.name == name)
            assert sum(r.nbytes for r in p.reads) == p.nbytes, (rank.rank, name)
            pieces |= {(r.src_box, r.nbytes) for r in p.reads}
        assert sum(n for _, n in pieces) == stored[name].numel() * stored[name].element_size(), name


def test_the_ranks_modules_are_transformers_fp8_linear(fp8):
    from transformers.integrations.finegrained_fp8 import FP8Linear

    from workers.local_model import rebuild_meta_model

    path, stored, _ = fp8
    model = rebuild_meta_model(orchestrator.plan(path, tp=2))
    fp8_modules = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert fp8_modules == {n.removesuffix(".weight_scale_inv") for n in stored if n.endswith(".weight_scale_inv")}
    assert type(model.lm_head) is torch.nn.Linear


def test_a_tp_degree_that_cuts_a_block_is_refused_at_plan_time(tmp_path):
    # intermediate 384 = 3 blocks: tp=2 would give each rank 192 rows, half a block of the gate/up projections
    path = checkpoints.fp8_llama(str(tmp_path / "fp8"), intermediate_size=384)
    with pytest.raises(PlanError) as err:
        orchestrator.plan(path, tp=2)
    message = str(err.value)
    assert "model.layers.0.mlp.gate_proj.weight" in message and "tp=2" in message, message
    assert "block size 128" in message and "[0, 192)" in message, message
    orchestrator.plan(path, tp=1, pp=2)  # pipeline stages cut no block


@pytest.mark.parametrize("tp, pp", [(2, 1), (2, 2)])
def test_raw_bytes_and_scales_on_every_rank_reassemble_to_the_checkpoint(fp8, tp, pp):
    path, stored, _ = fp8
    plan = orchestrator.plan(path, tp=tp, pp=pp, nodes=1)
    state, reports = checkpoints.load_in_process(plan)
    assert_raw_equal(state, stored)
    for rank, report in zip(plan.ranks, reports):
        assert report.bytes_read == rank.read_bytes  # its planned bytes, no more


def test_dequantized_shards_equal_transformers_cpu_load(fp8):
    path, _, model = fp8
    plan = orchestrator.plan(path, tp=2, quantization=FineGrainedFP8Config(dequantize=True))
    assert plan.quantization.dequantize
    state, _ = checkpoints.load_in_process(plan)
    checkpoints.assert_state_equal(state, model.state_dict())  # bf16 weights, no scales: what transformers holds


def test_plan_round_trips_through_json_with_its_quantization(fp8):
    plan = orchestrator.plan(fp8[0], tp=2, quantization=FineGrainedFP8Config(dequantize=True))
    again = plan_from_json(plan_to_json(plan))
    assert again.quantization == plan.quantization and again.ranks == plan.ranks


def test_unsupported_or_misplaced_quantization_is_refused(fp8, tmp_path):
    path = checkpoints.llama(str(tmp_path / "plain"))
    with pytest.raises(ConfigError, match="not quantized"):
        orchestrator.plan(path, quantization=FineGrainedFP8Config())
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    json.dump(config, open(config_path, "w"))
    with pytest.raises(ConfigError, match="quant_method='awq' is not supported"):
        orchestrator.plan(path)


@pytest.fixture(scope="module")
def fp8_moe(tmp_path_factory):
    path = checkpoints.fp8_qwen3_moe(str(tmp_path_factory.mktemp("fp8_qwen3_moe")))
    model = checkpoints.reference(path, quantization_config=FineGrainedFP8Config(dequantize=True))
    return path, model


@pytest.mark.parametrize("tp", [1, 2])
def test_moe_experts_stored_one_by_one_merge_their_scales_like_their_weights(fp8_moe, tp):
    from transformers.integrations.finegrained_fp8 import FP8Experts

    from workers.local_model import rebuild_meta_model

    path, model = fp8_moe
    stored = checkpoints.files_of(path)
    assert any(".experts.3.up_proj.weight_scale_inv" in k for f in stored for k in load_file(os.path.join(path, f)))
    plan = orchestrator.plan(path, tp=tp)
    assert plan.keys.clean, plan.keys  # every per-expert scale fills the fused experts' scales: nothing left over
    assert isinstance(rebuild_meta_model(plan).model.layers[0].mlp.experts, FP8Experts)
    scale = next(p for p in plan.ranks[0].params if p.name == "model.layers.0.mlp.experts.gate_up_proj_scale_inv")
    assert len(scale.reads) == 2 * 4  # gate and up scales of 4 experts, concatenated and stacked as their weights are
    dequantized = orchestrator.plan(path, tp=tp, quantization={"dequantize": True})
    state, _ = checkpoints.load_in_process(dequantized)
    checkpoints.assert_state_equal(state, model.state_dict())


def test_scales_the_checkpoint_does_not_fill_are_refused(fp8, tmp_path):
    from planning.errors import ConversionError

    path = checkpoints.rewrite(fp8[0], str(tmp_path / "renamed"), lambda state: {
        k.replace("q_proj.weight_scale_inv", "q_proj.scales"): v for k, v in state.items()})
    with pytest.raises(ConversionError, match=r"fills no value for 2 scale tensor\(s\).*q_proj.weight_scale_inv"):
        orchestrator.plan(path)


@pytest.mark.cluster
def test_fp8_over_ray_raw_and_dequantized(ray_cluster, fp8):
    path, stored, model = fp8
    logits, tokens = checkpoints.expected_outputs(model)
    with orchestrator.load(path, tp=2, nodes=2, progress=False) as m:
        assert_raw_equal(m.full_state_dict(), stored)
        with pytest.raises(PlanError, match="dequantize=True"):
            m.logits(checkpoints.PROMPT)  # FP8 matmuls are CUDA kernels; refused before any rank runs
        assert m.full_state_dict().keys() == stored.keys()  # the model is still up
    dequantize = FineGrainedFP8Config(dequantize=True)
    with orchestrator.load(path, pp=2, nodes=2, progress=False, quantization=dequantize) as m:
        checkpoints.assert_state_equal(m.full_state_dict(), model.state_dict())
        checkpoints.assert_inference_matches(m, logits, tokens, atol=0.0)  # bf16, the same operations
    # TP sums partial products in another order; in bf16 that moves logits by several ulps, so dequantize to float32
    fp32 = checkpoints.reference(path, dtype=torch.float32, quantization_config=dequantize)
    with orchestrator.load(path, tp=2, nodes=2, progress=False, quantization=dequantize, dtype="float32") as m:
        checkpoints.assert_state_equal(m.full_state_dict(), fp32.state_dict())
        checkpoints.assert_inference_matches(m, *checkpoints.expected_outputs(fp32))
    assert wait_until_clean() == ([], [])


def test_meshload_plan_shows_quantized_bytes_and_scales_per_rank(fp8, capsys):
    from orchestrator.cli import main
    from planning.summary import quantized_bytes

    path, stored, _ = fp8
    assert main(["plan", path, "--tp", "2", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "quantized      fp8, blocks 128x128" in out and "held quantized on the ranks" in out, out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("rank"))
    assert "fp8 weights" in header and "scales" in header, header
    plan = orchestrator.plan(path, tp=2, nodes=2)
    scale_bytes = sum(quantized_bytes(plan, r)[1] for r in plan.ranks)
    # q/o/gate/up/down split in two, k/v (one KV head) replicated: each rank reads half of the first, all of the second
    replicated = sum(t.numel() * 4 for n, t in stored.items() if n.endswith(("k_proj.weight_scale_inv", "v_proj.weight_scale_inv")))
    total = sum(t.numel() * 4 for n, t in stored.items() if n.endswith("weight_scale_inv"))
    assert scale_bytes == total + replicated
    assert main(["plan", path, "--pp", "2", "--nodes", "2", "--dequantize"]) == 0
    assert "dequantized to bfloat16 on each rank" in capsys.readouterr().out


def test_the_plan_cache_keys_the_quantization_option(fp8):
    from orchestrator.plan_cache import plan_key
    from workers.sources import resolve_model

    resolved = resolve_model(fp8[0])
    keys = {plan_key(resolved, dict(tp=2, quantization=q))
            for q in (None, FineGrainedFP8Config(dequantize=True), FineGrainedFP8Config(dequantize=False))}
    assert len(keys) == 3
    assert plan_key(resolved, dict(quantization=FineGrainedFP8Config(dequantize=True))) == plan_key(
        resolved, dict(quantization=FineGrainedFP8Config(dequantize=True)))
