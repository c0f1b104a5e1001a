"""The checkpoint index from headers only, for every layout, and the errors for broken indexes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors import safe_open

from planning.checkpoint import build_local_index
from planning.errors import CheckpointError
from tests import checkpoints


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("sharded")), tied=False)


def test_sharded_folder_matches_safetensors(sharded):
    index = build_local_index(sharded)
    assert len(index.files) == len(checkpoints.files_of(sharded)) > 1
    for f in index.files:
        with safe_open(os.path.join(sharded, f.name), "pt") as sf:
            for name in sf.keys():
                entry = index.tensors[name]
                assert entry.file == f.name
                assert entry.shape == tuple(sf.get_slice(name).get_shape())


def test_single_file_and_single_folder(tmp_path):
    path = checkpoints.llama(str(tmp_path / "one"), shard=None)
    by_folder = build_local_index(path)
    by_file = build_local_index(os.path.join(path, "model.safetensors"))
    assert by_folder.tensors == by_file.tensors
    assert [f.name for f in by_folder.files] == ["model.safetensors"]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_index(path, fn):
    index_path = os.path.join(path, "model.safetensors.index.json")
    data = json.load(open(index_path))
    fn(data["weight_map"])
    json.dump(data, open(index_path, "w"))


def test_index_pointing_at_missing_file(sharded, tmp_path):
    path = _copy(sharded, tmp_path / "c")
    victim = checkpoints.files_of(path)[0]
    os.remove(os.path.join(path, victim))
    with pytest.raises(CheckpointError, match=f"references {victim}, which does not exist"):
        build_local_index(str(path))


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_entries_cannot_escape_the_folder(sharded, tmp_path, evil):
    path = _copy(sharded, tmp_path / "c")
    _edit_index(path, lambda wm: wm.__setitem__("model.norm.weight", evil))
    with pytest.raises(CheckpointError, match="escapes the checkpoint folder|is absolute"):
        build_local_index(str(path))


def test_symlink_escaping_the_folder_is_refused(sharded, tmp_path):
    path = _copy(sharded, tmp_path / "c")
    outside = tmp_path / "outside.safetensors"
    victim = checkpoints.files_of(path)[0]
    shutil.move(os.path.join(path, victim), outside)
    os.symlink(outside, os.path.join(path, victim))
    with pytest.raises(CheckpointError, match=f"{victim}' escapes the checkpoint folder"):
        build_local_index(str(path))


def test_index_disagreeing_with_headers(sharded, tmp_path):
    path = _copy(sharded, tmp_path / "c")
    files = checkpoints.files_of(path)
    index = build_local_index(str(path))
    name = next(n for n, e in index.tensors.items() if e.file == files[0])
    _edit_index(path, lambda wm: wm.__setitem__(name, files[1]))
    with pytest.raises(CheckpointError, match=f"maps tensor '{name}' to {files[1]}"):
        build_local_index(str(path))


def test_truncated_shard(sharded, tmp_path):
    path = _copy(sharded, tmp_path / "c")
    victim = os.path.join(path, checkpoints.files_of(path)[1])
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"ends at data byte \d+ but the data section is only \d+ bytes"):
        build_local_index(str(path))


def test_pickle_checkpoint_refused_without_opt_in(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle checkpoint.*allow_pickle=True"):
        build_local_index(str(tmp_path))


def test_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json, model.safetensors"):
        build_local_index(str(tmp_path))
