"""Planning all ranks in one process: byte bounds, coverage, JSON round trip, purity, stage balance."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys

import pytest

from orchestrator import plan as make_plan
from planning.errors import ConfigError, PlanError
from planning.plan_json import plan_from_json, plan_to_json
from tests import checkpoints

HEADER_SLACK = 64 << 10


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("tied")), tied=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("untied")), tied=False)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_every_rank_reads_only_its_share(untied, tp, pp):
    plan = make_plan(untied, tp=tp, pp=pp, nodes=min(2, tp * pp))
    for r in plan.ranks:
        assert r.read_bytes <= 1.05 * r.param_bytes + HEADER_SLACK
    if pp == 1 and tp > 1:
        full = make_plan(untied, tp=1).ranks[0]
        sharded = {p.name for p in plan.ranks[0].params if p.shard is not None}
        assert sharded, "nothing sharded"

        def share(p):  # KV projections: 2 KV heads, replicated when tp > 2; vocab rows: one padding row at most
            if p.name not in sharded:
                return p.nbytes
            if "k_proj" in p.name or "v_proj" in p.name:
                return p.nbytes / min(tp, 2)
            return p.nbytes / tp + (32 * 4 if "embed" in p.name or "lm_head" in p.name else 0)

        bound = sum(share(p) for p in full.params)
        for r in plan.ranks:
            assert r.param_bytes <= bound


def test_json_round_trip_and_validation(tied):
    plan = make_plan(tied, tp=2, pp=2, nodes=2)
    text = plan_to_json(plan)
    back = plan_from_json(text)
    assert back == plan
    data = json.loads(text)
    item = data["ranks"][1]["params"][1]["reads"][0]
    item["dst_box"][0][1] -= 1  # a hole in the coverage
    with pytest.raises(PlanError, match="rank 1, .*: reads do not cover|differ in size"):
        plan_from_json(json.dumps(data))


def test_tied_embedding_across_stages_is_read_once(tied):
    plan = make_plan(tied, tp=2, pp=2, nodes=2)
    last = plan.ranks[2]
    head = next(p for p in last.params if p.name == "lm_head.weight")
    assert head.receive_from == 0 and not head.reads
    assert [(s.name, s.to_rank) for s in plan.ranks[0].sends] == [("model.embed_tokens.weight", 2)]
    reads = [i.tensor for r in plan.ranks for p in r.params for i in p.reads]
    assert reads.count("model.embed_tokens.weight") == 2  # once per TP rank of stage 0, never on stage 1
    same_stage = make_plan(tied, tp=2, pp=1, nodes=1)
    head = next(p for p in same_stage.ranks[0].params if p.name == "lm_head.weight")
    assert head.alias_of == "model.embed_tokens.weight"


def test_plan_is_pure_headers_only(untied):
    """No Ray import, and no more bytes read from weight files than their headers."""
    code = f"""
import builtins, io, os, sys
read = {{}}
real_open = builtins.open
class Counting:
    def __init__(self, f, name): self.f, self.name = f, name
    def read(self, n=-1):
        data = self.f.read(n); read[self.name] = read.get(self.name, 0) + len(data); return data
    def __getattr__(self, k): return getattr(self.f, k)
    def __enter__(self): return self
    def __exit__(self, *a): self.f.close()
def counting_open(file, *a, **k):
    f = real_open(file, *a, **k)
    return Counting(f, str(file)) if str(file).endswith(".safetensors") else f
builtins.open = counting_open
from planning.options import PlanOptions
from planning.planner import make_plan
from workers.sources import resolve_model
plan = make_plan(resolve_model({untied!r}), PlanOptions(tp=2, pp=2, nodes=2))
headers = {{f.name: f.header_size for f in plan.files}}
for name, n in read.items():
    assert n <= headers[os.path.basename(name)], (name, n)
assert read, "no header was read?"
assert "ray" not in sys.modules, "planning or the local source imported ray"
print("ok", len(read))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_stages_balance_bytes(untied):
    plan = make_plan(untied, tp=1, pp=2)
    assert plan.stages[0].layer_start == 0 and plan.stages[-1].layer_stop == 3
    sizes = [r.param_bytes for r in plan.ranks]
    assert max(sizes) / min(sizes) < 2.5


def test_device_map_overrides_the_cut(untied):
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
                  "model.norm": 1, "lm_head": 1, "model.rotary_emb": 0}
    plan = make_plan(untied, tp=1, pp=2, device_map=device_map)
    assert [(s.layer_start, s.layer_stop) for s in plan.stages] == [(0, 1), (1, 3)]
    with pytest.raises(PlanError, match="device_map places no stage for"):
        make_plan(untied, tp=1, pp=2, device_map={"model.layers": 0})


def test_max_memory_is_respected(untied):
    full = make_plan(untied, tp=1).ranks[0].param_bytes
    with pytest.raises(PlanError, match=r"rank 0 .* needs \d+ bytes of parameters, above its max_memory of 1000 bytes"):
        make_plan(untied, tp=1, max_memory=1000)
    plan = make_plan(untied, tp=2, pp=2, nodes=2, max_memory=full // 2)
    assert all(r.param_bytes <= full // 2 for r in plan.ranks)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tp=3), "tp=3 does not divide num_attention_heads=4"),
        (dict(tp=0), "tp=0 must be a positive integer"),
        (dict(pp=4), "pp=4 exceeds the number of layers (3)"),
        (dict(tp=2, nodes=3), "nodes=3 but only 2 rank(s)"),
        (dict(device="tpu"), "device='tpu'"),
        (dict(attn_implementation="flash_attention_2"), "needs device='cuda'"),
        (dict(tp_plan={"model.layers.*.mlp.gate": "colwise"}), "tp_plan keys match no parameter or module"),
        (dict(dtype="float12"), "unknown dtype 'float12'"),
    ],
)
def test_bad_topology_fails_at_plan_time(untied, kwargs, message):
    with pytest.raises((PlanError, ConfigError)) as err:
        make_plan(untied, **kwargs)
    assert message in str(err.value)


def test_bad_config_fails_with_values(untied, tmp_path):
    import shutil

    path = tmp_path / "bad"
    shutil.copytree(untied, path)
    config = json.load(open(path / "config.json"))
    config["num_attention_heads"] = 5
    json.dump(config, open(path / "config.json", "w"))
    with pytest.raises(ConfigError, match=r"config.json: invalid llama config: .*hidden size \(32\) is not a multiple of the number of attention heads \(5\)"):
        make_plan(str(path))


def test_without_architectures_the_class_is_the_one_the_checkpoint_fills(tmp_path):
    """No ``architectures`` in config.json: of the model type's auto classes, the one the checkpoint fills best
    (a BERT base checkpoint → BertModel, with nothing reported; a tied Llama → LlamaForCausalLM)."""
    from transformers import BertConfig, BertModel

    def drop_architectures(path):
        config = json.load(open(f"{path}/config.json"))
        del config["architectures"]
        json.dump(config, open(f"{path}/config.json", "w"))
        return path

    bert = str(tmp_path / "bert")
    checkpoints.save(BertModel(BertConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64)), bert)
    plan = make_plan(drop_architectures(bert), tp=2)
    assert plan.model.class_name == "BertModel" and plan.keys.clean
    llama = drop_architectures(checkpoints.llama(str(tmp_path / "llama"), tied=True))
    assert make_plan(llama).model.class_name == "LlamaForCausalLM"
