"""Bad input rejected at plan time, before any weight is read, with the file/tensor/values named:
checkpoints disagreeing with the config, remote code, malicious pickles."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

import orchestrator
from tests import checkpoints


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("llama")), tied=False)


def test_shape_disagreeing_with_config(llama, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(llama, path)
    config = json.load(open(path / "config.json"))
    config["intermediate_size"] = 64
    json.dump(config, open(path / "config.json", "w"))
    with pytest.raises(orchestrator.ConversionError) as err:
        orchestrator.plan(str(path))
    message = str(err.value)
    assert message.startswith("9 parameter(s) whose checkpoint shape differs from what config.json builds:")
    assert "'model.layers.0.mlp.down_proj.weight': checkpoint [32, 48] (from 'model.layers.0.mlp.down_proj.weight'), model [32, 64]" in message
    assert "'model.layers.2.mlp.gate_proj.weight': checkpoint [48, 32]" in message


def test_dtype_kind_disagreeing_with_config(llama, tmp_path):
    path = checkpoints.rewrite(llama, str(tmp_path / "ints"), lambda s: {
        k: (v.to(torch.int32) if k == "model.norm.weight" else v) for k, v in s.items()})
    with pytest.raises(orchestrator.ConversionError, match="'model.norm.weight': checkpoint tensor 'model.norm.weight' is int32 but the model expects float32"):
        orchestrator.plan(path)


def test_remote_code_is_not_run(llama, tmp_path):
    path = tmp_path / "remote"
    shutil.copytree(llama, path)
    config = json.load(open(path / "config.json"))
    config.update(model_type="my_secret_arch", auto_map={"AutoModelForCausalLM": "modeling.MyModel"})
    json.dump(config, open(path / "config.json", "w"))
    (path / "modeling.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('pwned')\n")
    with pytest.raises(orchestrator.ConfigError, match="needs custom code from the repository .*does not run remote code"):
        orchestrator.plan(str(path))
    assert not (tmp_path / "ran").exists()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_never_unpickled(llama, tmp_path):
    path = tmp_path / "evil"
    path.mkdir()
    shutil.copy(os.path.join(llama, "config.json"), path)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": torch.zeros(1), "x": _Evil(str(marker))}, path / "pytorch_model.bin",
               pickle_module=pickle)
    with pytest.raises(orchestrator.CheckpointError, match="pickle checkpoint; loading it can run arbitrary code"):
        orchestrator.plan(str(path))
    with pytest.raises(orchestrator.CheckpointError, match=r"pytorch_model.bin: torch.load\(weights_only=True\) refused it"):
        orchestrator.plan(str(path), allow_pickle=True)  # even with opt-in, only the restricted unpickler runs
    assert not marker.exists()


def test_checkpoint_missing_config(llama, tmp_path):
    path = tmp_path / "noconfig"
    shutil.copytree(llama, path)
    os.remove(path / "config.json")
    with pytest.raises(orchestrator.ConfigError, match="no config.json next to the checkpoint"):
        orchestrator.plan(str(path))


@pytest.mark.parametrize("device, share", [("cpu", 0.5), ("cuda", 0), ("cuda", 1.5)])
def test_gpus_per_rank_outside_one_gpu_is_refused_before_anything_starts(llama, device, share):
    with pytest.raises(ValueError, match=rf"gpus_per_rank={share!r}: a fraction of one GPU in \(0, 1\], for device='cuda' only"):
        orchestrator.load(llama, device=device, gpus_per_rank=share, address="127.0.0.1:1")  # no cluster is contacted
