"""Converters: a round trip per op against transformers' own ops, shard-level locate against the full
value, and real layouts (Mixtral's legacy experts, fused qkv, transposed, renamed, legacy gamma/beta,
casts, pickle) loaded bit-exact in process against transformers' from_pretrained."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from transformers.core_model_loading import (
    Chunk,
    Concatenate,
    MergeModulelist,
    Split,
    Transpose as TfTranspose,
    WeightConverter,
)

import orchestrator
from planning.boxes import box_shape
from planning.conversions import MESHLOAD_CONVERSIONS, register_conversion
from planning.errors import ConversionError
from planning.source_expr import Cat, Narrow, Source, Stack, Transpose, evaluate, fragment_view, locate
from tests import checkpoints


def _assemble(expr, box, tensors):
    out = torch.zeros(box_shape(box))
    for f in locate(expr, box):
        src = tensors[f.tensor][tuple(slice(a, b) for a, b in f.src_box)]
        out[tuple(slice(a, b) for a, b in f.dst_box)] = fragment_view(f, src)
    return out


def _random_boxes(shape, n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        box = []
        for size in shape:
            a = rng.randrange(size)
            box.append((a, rng.randint(a + 1, size)))
        yield tuple(box)


def _src(name, *shape):
    return Source(name, shape, "float32")


CASES = {
    "merge_modulelist": (lambda s: Stack((s["e0"], s["e1"], s["e2"]), 0),
                         lambda t: MergeModulelist(dim=0).convert({"p": [t["e0"], t["e1"], t["e2"]]}, ["p"], ["out"])["out"]),
    "concatenate": (lambda s: Cat((s["e0"], s["e1"]), 1),
                    lambda t: Concatenate(dim=1).convert({"a": [t["e0"]], "b": [t["e1"]]}, ["a", "b"], ["out"])["out"]),
    "merge_then_concat": (lambda s: Cat((Stack((s["e0"], s["e1"]), 0), Stack((s["e2"], s["e3"]), 0)), 1),
                          lambda t: Concatenate(dim=1).convert(
                              MergeModulelist(dim=0).convert({"g": [t["e0"], t["e1"]], "u": [t["e2"], t["e3"]]}, ["g", "u"], ["out"]),
                              ["g", "u"], ["out"])["out"]),
    "chunk": (lambda s: Narrow(s["qkv"], 0, 4, 4),
              lambda t: Chunk(dim=0).convert({"qkv": [t["qkv"]]}, ["qkv"], ["q", "k", "v"])["k"]),
    "transpose": (lambda s: Transpose(s["e0"], 0, 1),
                  lambda t: TfTranspose(0, 1).convert({"w": [t["e0"]]}, ["w"], ["out"])["out"]),
    "transpose_of_stack": (lambda s: Transpose(Stack((s["e0"], s["e1"]), 0), 1, 2),
                           lambda t: torch.stack([t["e0"], t["e1"]]).transpose(1, 2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converter_round_trip(case):
    torch.manual_seed(0)
    tensors = {f"e{i}": torch.randn(4, 6) for i in range(4)} | {"qkv": torch.randn(12, 6)}
    sources = {k: _src(k, *v.shape) for k, v in tensors.items()}
    build, transformers_op = CASES[case]
    expr = build(sources)
    full = evaluate(expr, tensors)
    assert torch.equal(full, transformers_op(tensors)), "expression disagrees with transformers' op"
    for box in _random_boxes(full.shape, 25, hash(case) % 1000):
        assert torch.equal(_assemble(expr, box, tensors), full[tuple(slice(a, b) for a, b in box)]), box


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return checkpoints.family(str(tmp_path_factory.mktemp("mixtral")), "mixtral")


def test_mixtral_legacy_experts_read_only_the_shard(mixtral):
    keys = json.load(open(os.path.join(mixtral, "model.safetensors.index.json")))["weight_map"]
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys  # as save_pretrained writes it
    plan = orchestrator.plan(mixtral, tp=2)
    for r in plan.ranks:
        assert r.read_bytes <= 1.05 * r.param_bytes
    gate_up = next(p for p in plan.ranks[1].params if p.name == "model.layers.0.mlp.experts.gate_up_proj")
    by_tensor = {i.tensor: i.src_box for i in gate_up.reads}
    inter = 48
    assert sorted(by_tensor) == sorted(f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w3"))
    assert all(box[0] == (inter // 2, inter) for box in by_tensor.values())  # rank 1: second half of every w1 and w3 only
    state, _ = checkpoints.load_in_process(plan)
    checkpoints.assert_state_equal(state, checkpoints.state_of(mixtral))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)


def test_unmatched_keys_are_reported_by_name_as_transformers_does(llama, tmp_path):
    """Unexpected tensors are not loaded and a missing one is initialised, as from_pretrained does (which
    initialises RMSNorm weights to ones: the state is bit-exact), and both are reported, sorted."""
    from transformers import AutoModelForCausalLM

    def edit(state):
        state["model.extra.weight"] = torch.zeros(3)
        state["model.layers.9.oops"] = torch.zeros(1)
        del state["model.norm.weight"]
        return state

    path = checkpoints.rewrite(llama, str(tmp_path / "bad"), edit)
    plan = orchestrator.plan(path, tp=2)
    reference, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert plan.keys.unexpected == tuple(sorted(info["unexpected_keys"])) == ("model.extra.weight", "model.layers.9.oops")
    assert plan.keys.missing == tuple(sorted(info["missing_keys"])) == ("model.norm.weight",)
    assert "initialised: 1 model tensor(s)" in "\n".join(plan.keys.lines())
    state, _ = checkpoints.load_in_process(plan)
    checkpoints.assert_state_equal(state, reference.state_dict())


def test_a_checkpoint_that_fills_nothing_is_refused(llama, tmp_path):
    path = checkpoints.rewrite(llama, str(tmp_path / "other"), lambda s: {f"other.{k}": v for k, v in s.items()})
    with pytest.raises(ConversionError, match="none of the checkpoint's 30 tensor\\(s\\) fills a tensor of LlamaForCausalLM"):
        orchestrator.plan(path)


def test_user_renamings(llama, tmp_path):
    path = checkpoints.rewrite(llama, str(tmp_path / "prefixed"),
                               lambda s: {k.replace("model.", "decoder.", 1): v for k, v in s.items()})
    unrenamed = orchestrator.plan(path)  # as transformers: not loaded, and initialised, but reported
    assert "decoder.embed_tokens.weight" in unrenamed.keys.unexpected
    assert "model.embed_tokens.weight" in unrenamed.keys.missing
    plan = orchestrator.plan(path, tp=2, renamings={r"^decoder\.": "model."})
    assert plan.keys.clean
    state, _ = checkpoints.load_in_process(plan)
    checkpoints.assert_state_equal(state, checkpoints.state_of(llama))


@pytest.fixture
def registered():
    saved = {k: list(v) for k, v in MESHLOAD_CONVERSIONS.items()}
    yield register_conversion
    MESHLOAD_CONVERSIONS.clear()
    MESHLOAD_CONVERSIONS.update(saved)


def test_fused_qkv_split_reads_only_each_ranks_heads(llama, tmp_path, registered):
    def fuse(state):
        for i in range(3):
            p = f"model.layers.{i}.self_attn."
            state[p + "qkv.weight"] = torch.cat([state.pop(p + n + ".weight") for n in ("q_proj", "k_proj", "v_proj")])
        return state

    path = checkpoints.rewrite(llama, str(tmp_path / "fused"), fuse)
    registered("llama", [WeightConverter(
        source_patterns="self_attn.qkv.weight",
        target_patterns=["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
        operations=[Split(dim=0)],
    )])
    plan = orchestrator.plan(path, tp=2)
    k = next(p for p in plan.ranks[1].params if p.name == "model.layers.0.self_attn.k_proj.weight")
    (item,) = k.reads
    assert item.tensor == "model.layers.0.self_attn.qkv.weight"
    assert item.src_box[0] == (32 + 8, 32 + 16)  # after the 32 query rows: rank 1's KV head (head_dim 8)
    for r in plan.ranks:
        assert r.read_bytes <= 1.05 * r.param_bytes
    state, _ = checkpoints.load_in_process(plan)
    checkpoints.assert_state_equal(state, checkpoints.state_of(llama))


def test_transposed_layout(llama, tmp_path, registered):
    path = checkpoints.rewrite(llama, str(tmp_path / "transposed"),
                               lambda s: {k: (v.T if "down_proj" in k else v) for k, v in s.items()})
    registered("llama", [WeightConverter(source_patterns="mlp.down_proj.weight", target_patterns="mlp.down_proj.weight",
                                         operations=[TfTranspose(0, 1)])])
    plan = orchestrator.plan(path, tp=2)
    state, _ = checkpoints.load_in_process(plan)
    checkpoints.assert_state_equal(state, checkpoints.state_of(llama))


@pytest.mark.parametrize("saved, load", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
def test_explicit_dtype_casts_on_the_rank(tmp_path, saved, load):
    path = checkpoints.llama(str(tmp_path / "ckpt"), dtype=saved)
    plan = orchestrator.plan(path, tp=2, dtype=load)
    assert plan.dtype == str(load).removeprefix("torch.")
    state, reports = checkpoints.load_in_process(plan)
    checkpoints.assert_state_equal(state, checkpoints.state_of(path, dtype=load))
    auto = orchestrator.plan(path, tp=2)
    assert auto.dtype == str(saved).removeprefix("torch.")  # "auto": the config's / checkpoint's dtype


def test_cast_needs_no_full_precision_copy(tmp_path):
    """Reading a 64 MiB bf16 tensor into float32 peaks at the destination plus a bounded staging slab."""
    from safetensors.torch import save_file

    path = str(tmp_path / "big.safetensors")
    save_file({"w": torch.zeros(4096, 8192, dtype=torch.bfloat16)}, path)
    code = f"""
import torch
from planning.checkpoint import build_local_index
from planning.plan import ReadItem
from workers.reader import CheckpointFiles, read_item
from workers.report import peak_rss_bytes
index = build_local_index({path!r}); e = index.tensors["w"]
dest = torch.ones(4096, 8192, dtype=torch.float32)  # touched: 128 MiB resident
before = peak_rss_bytes()
box = ((0, 4096), (0, 8192))
with CheckpointFiles({{"big.safetensors": {path!r}}}) as files:
    read_item(files, ReadItem("w", e.file, e.start, e.shape, e.dtype, box, box, (0, 1)), dest, staging_bytes=4 << 20)
print(peak_rss_bytes() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip())
    assert growth < 24 << 20, f"peak RSS grew by {growth >> 20} MiB while casting (a full copy would be 64-128 MiB)"


def test_legacy_gamma_beta_names(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    src = str(tmp_path / "bert")
    BertModel(BertConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(src)
    path = checkpoints.rewrite(src, str(tmp_path / "legacy"), lambda s: {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in s.items()})
    plan = orchestrator.plan(path, tp=2)
    state, _ = checkpoints.load_in_process(plan)
    checkpoints.assert_state_equal(state, AutoModel.from_pretrained(src).state_dict())


def test_pickle_checkpoint_with_opt_in(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama)
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(os.path.join(llama, "config.json"), path)
    # transformers v5 no longer writes pickles: write the legacy sharded layout the way v4 did.
    state = model.state_dict()
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
    for fname, keys in shards.items():
        torch.save({k: state[k].clone() for k in keys}, path / fname)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    path = str(path)
    with pytest.raises(orchestrator.CheckpointError, match="allow_pickle=True"):
        orchestrator.plan(path, tp=2)
    plan = orchestrator.plan(path, tp=2, allow_pickle=True)
    assert plan.model.checkpoint_format == "pickle"
    for r in plan.ranks:
        assert r.read_bytes <= 1.05 * r.param_bytes
    state, _ = checkpoints.load_in_process(plan)
    checkpoints.assert_state_equal(state, model.state_dict())


def test_gpt2_legacy_buffers_as_transformers_treats_them(tmp_path, capsys):
    """GPT-2 checkpoints of older transformers versions hold per-layer ``attn.bias`` (which GPT-2 declares it
    ignores) and ``attn.masked_bias`` (which transformers reports as unexpected): loaded anyway, state bit-exact,
    reported as from_pretrained reports them, and printed by ``meshload plan``."""
    from transformers import GPT2LMHeadModel

    from orchestrator.cli import main

    saved = checkpoints.family(str(tmp_path / "gpt2"), "gpt2", shard=None)

    def legacy(state):
        for i in range(3):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128, dtype=torch.bool))[None, None]
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        return state

    path = checkpoints.rewrite(saved, str(tmp_path / "legacy"), legacy)
    reference, info = GPT2LMHeadModel.from_pretrained(path, output_loading_info=True)
    plan = orchestrator.plan(path, tp=2)
    assert plan.keys.ignored == tuple(f"transformer.h.{i}.attn.bias" for i in range(3))
    assert plan.keys.unexpected == tuple(sorted(info["unexpected_keys"])) == tuple(f"transformer.h.{i}.attn.masked_bias" for i in range(3))
    assert plan.keys.missing == ()
    state, _ = checkpoints.load_in_process(plan)
    checkpoints.assert_state_equal(state, reference.state_dict())
    assert main(["plan", path, "--tp", "2"]) == 0
    assert "not loaded: 3 checkpoint tensor(s) that match no model tensor (transformers: UNEXPECTED)" in capsys.readouterr().out
