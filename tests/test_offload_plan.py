"""Planning offload (``planning.offload``): budgets fill the device, then host memory, then disk, layer by
layer; ``device_map`` tiers; the plan records each tensor's tier through JSON, validation and the
plan-vs-checkpoint check; ``meshload plan`` shows it; bad budgets are errors with the values. No Ray."""

from __future__ import annotations

import dataclasses
import json

import pytest

from orchestrator.cli import main as cli_main
from orchestrator import plan as make_plan
from planning.errors import PlanError
from planning.offload import layer_tiers, stream_bytes, tier_bytes
from planning.plan_json import plan_from_json, plan_to_json
from planning.plan_check import check_plan_matches
from workers.sources import resolve_model
from tests import checkpoints

LAYERS = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("llama6")), tied=False, num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def sizes(ckpt):
    """(bytes of one layer, bytes outside the layers) of the unsharded model."""
    rank = make_plan(ckpt, tp=1).ranks[0]
    layer = sum(p.nbytes for p in rank.params if p.name.startswith("model.layers.0."))
    return layer, rank.param_bytes - LAYERS * layer


def test_budgets_fill_the_device_then_cpu_then_disk_layer_by_layer(ckpt, sizes):
    layer, staying = sizes
    device = staying + 2 * layer + 2 * layer  # two resident layers + room to stream two
    plan = make_plan(ckpt, tp=1, max_memory={"device": device, "cpu": 2 * layer + layer // 2})
    rank = plan.ranks[0]
    assert layer_tiers(rank, plan.layers_path) == {"device": [0, 1], "cpu": [2, 3], "disk": [4, 5]}
    assert tier_bytes(rank, None) == staying + 2 * layer and stream_bytes(rank, plan.layers_path) == 2 * layer
    assert tier_bytes(rank, "cpu") == tier_bytes(rank, "disk") == 2 * layer
    assert plan.budgets == (device,) and plan.cpu_budgets == (2 * layer + layer // 2,)
    assert all(p.offload is None for p in rank.params if not p.name.startswith("model.layers."))
    assert plan_from_json(plan_to_json(plan)) == plan
    # no "cpu" budget: what leaves the device goes to disk; a budget the model fits: nothing offloaded
    plan = make_plan(ckpt, tp=1, max_memory={"device": device})
    assert layer_tiers(plan.ranks[0], plan.layers_path) == {"device": [0, 1], "cpu": [], "disk": [2, 3, 4, 5]}
    plan = make_plan(ckpt, tp=1, max_memory={"device": "10MiB", "cpu": "1.5TiB"})
    assert not any(p.offload for p in plan.ranks[0].params) and plan.cpu_budgets == (3 << 39,)
    # the spelling with the device's name, per rank, and accelerate's size strings
    plan = make_plan(ckpt, tp=2, device="cuda", max_memory={0: {"cuda": device // 2, "cpu": "1GiB"}, 1: "10MiB"})
    assert layer_tiers(plan.ranks[0], plan.layers_path)["cpu"] and not any(p.offload for p in plan.ranks[1].params)
    assert plan.cpu_budgets == (1 << 30, None)


def test_device_map_places_module_prefixes(ckpt):
    plan = make_plan(ckpt, tp=2, pp=2, nodes=2, device_map={
        "model.layers.4": "disk", "model.layers.4.input_layernorm": "device", "model.layers.1.mlp": "cpu",
    })
    for r in plan.ranks:
        where = {p.name: p.offload for p in r.params}
        if r.stage == 0:
            assert {n for n, t in where.items() if t} == {f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
            assert set(where.values()) == {None, "cpu"}
        else:
            assert where["model.layers.4.input_layernorm.weight"] is None
            assert where["model.layers.4.self_attn.o_proj.weight"] == "disk"
            assert layer_tiers(r, plan.layers_path)["disk"] == [4]
    assert plan_from_json(plan_to_json(plan)) == plan
    # stages and tiers in one map
    plan = make_plan(ckpt, tp=1, pp=2, device_map={"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0,
                                                   "model.layers.2": 1, "model.layers.3": 1, "model.layers.4": 1,
                                                   "model.layers.5": 1, "model.norm": 1, "lm_head": 1, "model.layers.5.mlp": "disk"})
    assert [(s.layer_start, s.layer_stop) for s in plan.stages] == [(0, 2), (2, 6)]
    assert layer_tiers(plan.ranks[1], plan.layers_path)["disk"] == [5]
    with pytest.raises(PlanError, match=r"device_map\['model.embed_tokens'\] = 'cpu' places model.embed_tokens.weight off the device"):
        make_plan(ckpt, tp=1, device_map={"model.embed_tokens": "cpu"})
    with pytest.raises(PlanError, match=r"device_map\['model.layers.1'\] = 'gpu': expected a stage index, 'cpu', 'disk'"):
        make_plan(ckpt, tp=1, device_map={"model.layers.1": "gpu"})
    with pytest.raises(PlanError, match=r"rank 0 .* needs \d+ bytes of parameters on its device plus \d+ to stream"):
        make_plan(ckpt, tp=1, device_map={"model.layers.1": "cpu"}, max_memory=make_plan(ckpt, tp=1).ranks[0].param_bytes)
    with pytest.raises(PlanError, match=r"device_map offloads \d+ bytes to 'cpu', above its max_memory\['cpu'\] of 10 bytes"):
        make_plan(ckpt, tp=1, device_map={"model.layers.1": "cpu"}, max_memory={"cpu": 10})


def test_bad_budgets_are_errors_with_values(ckpt, sizes):
    layer, staying = sizes
    cases = [
        ({"gpu": "1GiB"}, r"max_memory: unknown key\(s\) \['gpu'\]; expected \['device', 'cpu'\]"),
        ({"cuda": "1GiB"}, r"'cuda' budgets a GPU, and this plan's device is 'cpu'"),
        ({"device": "1GiB", "disk": "1TiB"}, r"unknown key\(s\) \['disk'\].*disk is not budgeted"),
        ({0: "1GiB", "cpu": "1GiB"}, r"max_memory keys must be ranks in \[0, 1\) or devices .*got \['cpu'\]"),
        ({3: "1GiB"}, r"got \[3\]"),
        ({"device": "12 parsecs"}, r"max_memory\['device'\]: cannot read '12 parsecs' as a size"),
        ({"device": -5}, r"-5 bytes is negative"),
        ({"device": layer - 1, "cpu": "1GiB"},
         rf"rank 0 \(stage 0, tp rank 0\): layer 0 of model.layers needs {layer} bytes on the device while it runs, "
         rf"above the device budget of {layer - 1} bytes"),
        ({"device": staying + 2 * layer - 1},
         rf"nothing fits its device budget of {staying + 2 * layer - 1} bytes: {staying} bytes stay on the device "
         rf"\(embeddings, final norm, head\) and streaming needs room for two layers \(2 x {layer} bytes\)"),
        (1000, r"rank 0 .* needs \d+ bytes of parameters, above its max_memory of 1000 bytes; .* per device"),
    ]
    for max_memory, message in cases:
        with pytest.raises(PlanError, match=message):
            make_plan(ckpt, tp=1, max_memory=max_memory)
    with pytest.raises(PlanError, match=r"\['device', 'cuda'\] both name the rank's device"):
        make_plan(ckpt, tp=1, device="cuda", max_memory={"device": 1, "cuda": 1})


def test_validation_and_plan_check_refuse_a_tampered_offload(ckpt, sizes):
    layer, staying = sizes
    max_memory = {"device": staying + 4 * layer, "cpu": 2 * layer}
    plan = make_plan(ckpt, tp=1, max_memory=max_memory)
    data = json.loads(plan_to_json(plan))
    params = data["ranks"][0]["params"]

    def tampered(edit) -> str:
        copy = json.loads(json.dumps(data))
        edit(copy["ranks"][0]["params"])
        return json.dumps(copy)

    embed = next(i for i, p in enumerate(params) if p["name"] == "model.embed_tokens.weight")
    on_disk = [i for i, p in enumerate(params) if p["offload"] == "disk"]
    with pytest.raises(PlanError, match=r"rank 0, model.embed_tokens.weight: offloaded to 'disk' but not a tensor of the layers"):
        plan_from_json(tampered(lambda ps: ps[embed].update(offload="disk")))
    with pytest.raises(PlanError, match=r"offload 'tape', expected one of \('cpu', 'disk'\)"):
        plan_from_json(tampered(lambda ps: ps[on_disk[0]].update(offload="tape")))
    with pytest.raises(PlanError, match=r"rank 0: \d+ bytes of parameters on its device plus \d+ to stream offloaded layers exceed its budget"):
        plan_from_json(tampered(lambda ps: [ps[i].update(offload=None) for i in on_disk]))
    with pytest.raises(PlanError, match=r"rank 0: \d+ bytes offloaded to host memory exceed its cpu budget"):
        plan_from_json(tampered(lambda ps: [ps[i].update(offload="cpu") for i in on_disk]))
    resolved = resolve_model(ckpt)
    options = dict(tp=1, pp=1, nodes=1, device="cpu", max_memory=max_memory)
    check_plan_matches(plan, resolved, options=options)
    with pytest.raises(PlanError, match=r"has \(device, cpu\) budgets .* not the .* of max_memory="):
        check_plan_matches(plan, resolved, options={**options, "max_memory": {"device": staying + 4 * layer}})
    other = dataclasses.replace(plan, cpu_budgets=(None,))
    with pytest.raises(PlanError, match="budgets"):
        check_plan_matches(other, resolved, options=options)


def test_meshload_plan_shows_which_layers_live_where(ckpt, sizes, capsys):
    layer, staying = sizes
    budget = json.dumps({"device": staying + 4 * layer, "cpu": 2 * layer})
    assert cli_main(["plan", ckpt, "--max-memory", budget]) == 0
    out = capsys.readouterr().out
    assert "offload (layers of model.layers; embeddings, final norm and head stay on the device)" in out
    row = next(line for line in out.splitlines() if line.split()[:3] == ["0", "0", "0"] and "streamed" in line)
    assert row.split()[3] == "0-1" and "2-3" in row and "4-5" in row, row
    assert cli_main(["plan", ckpt, "--device-map", '{"model.layers.2": "disk"}', "--json"]) == 0
    plan = plan_from_json(capsys.readouterr().out)
    assert layer_tiers(plan.ranks[0], plan.layers_path)["disk"] == [2]
    assert cli_main(["plan", ckpt, "--max-memory", '{"gpu": 1}']) == 2
    assert "unknown key(s) ['gpu']" in capsys.readouterr().err
