"""A rank with offloaded layers, in this process (no Ray): "cpu" tensors in host memory, "disk" tensors
zero-copy views of the checkpoint file (or, for a cast or a strided slice, files of the rank's own that
leave nothing behind), none of their pages resident; the forward streams them one layer ahead and its
logits equal the fully-resident load's bit for bit."""

from __future__ import annotations

import mmap
import os
import struct

import pytest
import torch

from orchestrator import plan as make_plan
from planning.offload import layer_tiers
from tests import checkpoints
from workers.assemble import assemble_state_dict
from workers.rank_worker import RankWorker

LAYERS = 6
BOUNDARY = 2  # pages a tensor may share with its neighbours in the file


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tensors of 64-256 KiB (many pages each), so that residency is measured on more than boundary pages."""
    return checkpoints.llama(str(tmp_path_factory.mktemp("llama6")), tied=False, num_hidden_layers=LAYERS,
                             hidden_size=256, intermediate_size=512, shard="600KB")


@pytest.fixture(scope="module")
def spill(ckpt):
    """max_memory that keeps layers 0-1 on the device, 2-3 in host memory and 4-5 on disk."""
    rank = make_plan(ckpt, tp=1).ranks[0]
    layer = sum(p.nbytes for p in rank.params if p.name.startswith("model.layers.0."))
    staying = rank.param_bytes - LAYERS * layer
    return {"device": staying + 4 * layer, "cpu": 2 * layer}


def _paths(plan):
    return {f.name: os.path.join(plan.model.root, f.name) for f in plan.files}


def _loaded(plan, rank=0, **kwargs) -> RankWorker:
    worker = RankWorker(plan, rank, **kwargs)
    worker.load(_paths(plan))
    worker.finalize()
    return worker


def mapping_of(t: torch.Tensor) -> str:
    """The /proc/self/maps path of the mapping holding ``t``'s first byte ('' for anonymous memory)."""
    addr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= addr < end:
                return fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"address {addr:#x} is not mapped")


def resident_pages(t: torch.Tensor) -> int:
    """Pages of ``t``'s bytes present in this process's page table (``/proc/self/pagemap``, bit 63). Its first
    and last page may hold a neighbouring tensor's bytes too, which that tensor's use brings in."""
    start = t.data_ptr() // mmap.PAGESIZE
    end = -(-(t.data_ptr() + t.numel() * t.element_size()) // mmap.PAGESIZE)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start * 8)
        entries = struct.unpack(f"{end - start}Q", f.read((end - start) * 8))
    return sum(e >> 63 for e in entries)


def _forward(worker: RankWorker) -> torch.Tensor:
    ip, port = worker.pick_port()
    worker.init_inference(ip, port, backend="gloo", collective_timeout_s=60)
    try:
        return worker.forward_step(checkpoints.PROMPT), worker.forward_step(checkpoints.PROMPT)
    finally:
        worker.close()


def test_offloaded_tensors_live_where_the_plan_puts_them(ckpt, spill):
    plan = make_plan(ckpt, tp=1, max_memory=spill)
    assert layer_tiers(plan.ranks[0], plan.layers_path) == {"device": [0, 1], "cpu": [2, 3], "disk": [4, 5]}
    worker = _loaded(plan)
    placement = worker.placement()
    for name, where in placement.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        want = {2: "cpu", 3: "cpu", 4: "disk:checkpoint", 5: "disk:checkpoint"}.get(layer, "device")
        assert where == want, (name, where)  # "cpu" not "cpu-pinned": no GPU, the pinning seam is off
    for name, where in placement.items():
        t = worker.tensors[name]
        if where == "disk:checkpoint":
            assert mapping_of(t).endswith(".safetensors") and mapping_of(t).startswith(ckpt), (name, mapping_of(t))
            assert resident_pages(t) <= BOUNDARY, name
        elif where == "cpu":
            assert not mapping_of(t).endswith(".safetensors"), name  # a copy in host memory
    state = assemble_state_dict(plan, {0: worker.local_state()})
    checkpoints.assert_state_equal(state, checkpoints.state_of(ckpt))


def test_cast_and_strided_disk_tensors_go_to_files_of_the_rank(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHLOAD_OFFLOAD_DIR", str(tmp_path))
    device_map = {"model.layers.1": "disk"}
    for dtype, kinds in (("float32", {"disk:checkpoint", "disk:own"}), ("bfloat16", {"disk:own"})):
        plan = make_plan(ckpt, tp=2, dtype=dtype, device_map=device_map)
        resident = make_plan(ckpt, tp=2, dtype=dtype)
        workers = [_loaded(plan, r) for r in range(2)]
        for w in workers:
            disk = {n: k for n, k in w.placement().items() if k.startswith("disk")}
            assert set(disk) == {p.name for p in w.rank_plan.params if p.name.startswith("model.layers.1.")}
            assert set(disk.values()) == kinds, disk
            if dtype == "float32":  # a dim-0 slice is one range of the file; a dim-1 slice is not
                assert disk["model.layers.1.self_attn.q_proj.weight"] == "disk:checkpoint"
                assert disk["model.layers.1.self_attn.o_proj.weight"] == "disk:own"
            for name, kind in disk.items():
                t = w.tensors[name]
                if kind == "disk:own":  # an unnamed file in MESHLOAD_OFFLOAD_DIR, nothing left there by name
                    assert mapping_of(t).startswith(str(tmp_path)) and mapping_of(t).endswith("(deleted)"), mapping_of(t)
                assert resident_pages(t) <= BOUNDARY, name
        assert os.listdir(tmp_path) == []
        got = assemble_state_dict(plan, {w.rank: w.local_state() for w in workers})
        want = assemble_state_dict(resident, {r: _loaded(resident, r).local_state() for r in range(2)})
        checkpoints.assert_state_equal(got, want)


def test_forward_streams_offloaded_layers_one_ahead_and_matches_the_resident_load(ckpt, spill):
    plan = make_plan(ckpt, tp=1, max_memory=spill)
    worker = _loaded(plan)
    want, _ = _forward(_loaded(make_plan(ckpt, tp=1)))
    ip, port = worker.pick_port()
    worker.init_inference(ip, port, backend="gloo", collective_timeout_s=60)
    streamer = worker.streamer
    assert streamer.order == [2, 3, 4, 5]
    seen = {}
    layers = worker.model.get_submodule(plan.layers_path)
    for i in range(LAYERS):  # registered after the streamer's: sees the layer as it computes
        layers[i].register_forward_pre_hook(
            lambda module, args, i=i: seen.setdefault(i, []).append((sorted(streamer._resident), sorted(streamer._pending)))
        )
    try:
        first = worker.forward_step(checkpoints.PROMPT)
        second = worker.forward_step(checkpoints.PROMPT)
        tokens = checkpoints.reference(ckpt).generate(checkpoints.PROMPT, max_new_tokens=3, do_sample=False)
    finally:
        worker.close()
    assert torch.equal(first, want) and torch.equal(second, want)
    with torch.no_grad():
        assert torch.equal(first, checkpoints.reference(ckpt)(checkpoints.PROMPT).logits)
    # while layer i computes, its copy is in place and the next offloaded layer's is on its way: two at most
    assert seen[1] == [([], []), ([], [2])]  # the second forward's first offloaded layer was prefetched by the first
    for i, next_one in ((2, 3), (3, 4), (4, 5), (5, 2)):
        assert seen[i] == [([i], [next_one])] * 2, (i, seen[i])
    layer_bytes = sum(p.nbytes for p in plan.ranks[0].params if p.name.startswith("model.layers.2."))
    assert streamer.streamed_bytes == (2 * 4 + 1) * layer_bytes  # two forwards of 4 layers, and the next first one
    for name, where in worker.placement().items():  # back on their host tensors, disk pages not resident
        param = worker.model.get_parameter(name)
        assert param.data_ptr() == worker.tensors[name].data_ptr(), name
        if where.startswith("disk"):
            assert resident_pages(worker.tensors[name]) <= BOUNDARY, name
    assert tokens.shape[1] == checkpoints.PROMPT.shape[1] + 3


def test_an_offloaded_tensor_the_checkpoint_lacks_is_initialised_then_moved_to_its_tier(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHLOAD_OFFLOAD_DIR", str(tmp_path / "offload"))
    os.mkdir(tmp_path / "offload")
    missing = "model.layers.3.post_attention_layernorm.weight"
    path = checkpoints.rewrite(ckpt, str(tmp_path / "ckpt"), lambda state: {k: v for k, v in state.items() if k != missing})
    for tier, kind in (("disk", "disk:own"), ("cpu", "cpu")):
        plan = make_plan(path, tp=1, device_map={"model.layers.3": tier})
        assert next(p for p in plan.ranks[0].params if p.name == missing).computed
        worker = _loaded(plan)
        assert worker.placement()[missing] == kind
        t = worker.tensors[missing]
        assert worker.model.get_parameter(missing).data_ptr() == t.data_ptr()
        if tier == "disk":
            assert mapping_of(t).startswith(str(tmp_path / "offload")) and resident_pages(t) <= BOUNDARY
        state = assemble_state_dict(plan, {0: worker.local_state()})
        checkpoints.assert_state_equal(state, checkpoints.state_of(path))  # initialised as from_pretrained does
    assert os.listdir(tmp_path / "offload") == []
