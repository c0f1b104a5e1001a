"""The checkpoint index: every tensor's file, dtype, shape and byte range, from headers only.

A checkpoint arrives as a folder with ``model.safetensors.index.json`` and shards, a folder with one
``model.safetensors``, or a single ``.safetensors`` file. Whatever the layout, planning sees one
``CheckpointIndex``; building it reads a few kilobytes per file (the headers) and validates them, so
that a missing shard, an index entry escaping the folder, or a header that disagrees with the index is
reported before any weight byte is read.

Runs on the driver. Legacy pickle checkpoints (``.bin``) are detected here and refused unless the
caller opted in; their index is built by ``planning.pickle_checkpoint``.
"""

from __future__ import annotations

import json
import os

from planning.checkpoint_index import CheckpointFile, CheckpointIndex, TensorEntry  # the types; importers of them here keep working
from planning.confinement import confined_path
from planning.errors import CheckpointError
from planning.safetensors_header import SafetensorsHeader, read_header

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


def index_from_headers(
    root: str | None, headers: dict[str, SafetensorsHeader], *, weight_map: dict[str, str] | None = None,
    sha256: dict[str, str] | None = None, git_sha1: dict[str, str] | None = None, index_name: str = SAFE_INDEX,
) -> CheckpointIndex:
    """Combine per-file headers (and the sharded index's weight map, if any) into one index.

    The weight map must agree with the headers: a tensor mapped to a file whose header lacks it is an
    error; so is one tensor present in two files.
    """
    tensors: dict[str, TensorEntry] = {}
    for fname in sorted(headers):
        for t in headers[fname].tensors:
            if t.name in tensors:
                raise CheckpointError(
                    f"tensor {t.name!r} appears in both {tensors[t.name].file} and {fname}"
                )
            tensors[t.name] = TensorEntry(t.name, fname, t.dtype, t.shape, t.start, t.end)
    if weight_map is not None:
        for name, fname in sorted(weight_map.items()):
            entry = tensors.get(name)
            if entry is None:
                raise CheckpointError(f"{index_name} maps tensor {name!r} to {fname}, but that file's header has no such tensor")
            if entry.file != fname:
                raise CheckpointError(f"{index_name} maps tensor {name!r} to {fname}, but it is stored in {entry.file}")
        stray = sorted(set(tensors) - set(weight_map))
        if stray:
            raise CheckpointError(f"{index_name} does not list {len(stray)} tensor(s) found in the shards: {stray[:10]}")
    files = tuple(
        CheckpointFile(
            name=f, size=h.file_size, header_size=h.header_size, sha256=(sha256 or {}).get(f), header_sha256=h.sha256,
            git_sha1=(git_sha1 or {}).get(f),
        )
        for f, h in sorted(headers.items())
    )
    return CheckpointIndex(root=root, files=files, tensors=tensors)


def load_weight_map(index_path: str) -> dict[str, str]:
    """Read ``*.index.json`` and return its ``weight_map`` (tensor → file), validated for shape."""
    try:
        with open(index_path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index_path}: not valid JSON ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_path}: expected an object with a 'weight_map' of tensor name → file name")
    return weight_map


def find_checkpoint(path: str) -> tuple[str, str, str | None]:
    """Locate the checkpoint under a local ``path``.

    Returns ``(root, kind, entry)`` where kind is ``"safetensors-index"``, ``"safetensors-single"``,
    ``"pickle-index"`` or ``"pickle-single"`` and ``entry`` the index or single file name.
    """
    if os.path.isfile(path):
        root, name = os.path.split(os.path.abspath(path))
        if name.endswith(".safetensors"):
            return root, "safetensors-single", name
        if name.endswith(".index.json"):
            return root, ("pickle-index" if ".bin." in name else "safetensors-index"), name
        if name.endswith((".bin", ".pt", ".pth")):
            return root, "pickle-single", name
        raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors, .bin or an .index.json)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder")
    root = os.path.abspath(path)
    kind, entry = choose_layout([n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n))], where=path)
    return root, kind, entry


def choose_layout(names, *, where: str) -> tuple[str, str]:
    """A checkpoint's layout from the file names at its root (a folder's, a Hub repo's): ``(kind, entry)``,
    kind ``"safetensors-index"``, ``"safetensors-single"``, ``"pickle-index"`` or ``"pickle-single"``.

    Safetensors first: the sharded index, ``model.safetensors``, else a lone ``*.safetensors``; a pickle
    checkpoint (``pytorch_model.bin[.index.json]``) only when there is none. ``where`` names the place in
    the error."""
    names = set(names)
    if SAFE_INDEX in names:
        return "safetensors-index", SAFE_INDEX
    if SAFE_SINGLE in names:
        return "safetensors-single", SAFE_SINGLE
    singles = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    if len(singles) == 1:
        return "safetensors-single", singles[0]
    if PICKLE_INDEX in names:
        return "pickle-index", PICKLE_INDEX
    if PICKLE_SINGLE in names:
        return "pickle-single", PICKLE_SINGLE
    raise CheckpointError(
        f"{where}: no {SAFE_INDEX}, {SAFE_SINGLE} or {PICKLE_SINGLE} found "
        f"(found {len(singles)} .safetensors files without an index)"
    )


def build_local_index(path: str, *, allow_pickle: bool = False) -> CheckpointIndex:
    """Build the index of a local checkpoint by reading only its headers."""
    root, kind, entry = find_checkpoint(path)
    if kind.startswith("pickle"):
        if not allow_pickle:
            raise CheckpointError(
                f"{os.path.join(root, entry)} is a pickle checkpoint; loading it can run arbitrary code, so meshload "
                f"refuses it unless you pass allow_pickle=True (it is then read with torch.load(weights_only=True)). "
                f"Prefer converting it to safetensors."
            )
        from planning.pickle_checkpoint import build_pickle_index

        weight_map = load_weight_map(confined_path(root, entry, what=root)) if kind == "pickle-index" else None
        return build_pickle_index(root, entry=entry, weight_map=weight_map)
    if kind == "safetensors-single":
        file = confined_path(root, entry, what=root)
        headers = {entry: read_header(file, display_name=entry)}
        return index_from_headers(root, headers)
    weight_map = load_weight_map(confined_path(root, entry, what=root))
    headers = {}
    for fname in sorted(set(weight_map.values())):
        file = confined_path(root, fname, what=f"{entry}")
        if not os.path.isfile(file):
            raise CheckpointError(f"{entry} references {fname}, which does not exist in {root}")
        headers[fname] = read_header(file, display_name=fname)
    return index_from_headers(root, headers, weight_map=weight_map, index_name=entry)
