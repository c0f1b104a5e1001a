"""Index legacy ``.bin`` checkpoints (torch zip/pickle format), only when the user opted in.

Unpickling can run arbitrary code, so ``planning.checkpoint`` refuses these files unless
``allow_pickle=True``; even then they are opened with ``torch.load(weights_only=True, mmap=True)``:
the restricted unpickler, and a memory map instead of a read. torch stores every storage as an
uncompressed zip record of raw little-endian bytes, and an mmap load makes each storage a slice of
one mapping of the file, so a tensor's byte range in the file follows from its storage address.
With those ranges the index looks exactly like a safetensors one, and ranks read their boxes with
the same ``pread`` path — only the bytes of their shard, never the whole file.

Runs on the driver (planning); touches the pickle and the zip directory, never tensor data.
"""

from __future__ import annotations

import os
import zipfile

from planning.checkpoint_index import CheckpointFile, CheckpointIndex, TensorEntry
from planning.confinement import confined_path
from planning.errors import CheckpointError
from planning.safetensors_header import TORCH_DTYPE_ITEMSIZE


def _record_offsets(path: str) -> tuple[list[int], str]:
    """Data offsets of the storage records of a torch zip checkpoint, and its byte order."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(path)
    except RuntimeError as exc:
        raise CheckpointError(f"{os.path.basename(path)}: not a torch zip checkpoint ({exc}); old non-zip pickles are not supported") from None
    records = reader.get_all_records()
    offsets = sorted(reader.get_record_offset(r) for r in records if r.startswith("data/"))
    order = reader.get_record("byteorder").decode() if "byteorder" in records else "little"
    with zipfile.ZipFile(path) as z:
        if any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist() if "/data/" in i.filename):
            raise CheckpointError(f"{os.path.basename(path)}: compressed storage records cannot be read in place")
    return offsets, order


def _file_entries(path: str, name: str) -> tuple[dict[str, TensorEntry], int]:
    import torch

    offsets, order = _record_offsets(path)
    if order != "little":
        raise CheckpointError(f"{name}: stored with byte order {order!r}; only little-endian checkpoints are supported")
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - the restricted unpickler raises many types
        raise CheckpointError(f"{name}: torch.load(weights_only=True) refused it: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{name}: holds a {type(state).__name__}, expected a state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    others = sorted(k for k in state if k not in tensors)
    if others:
        raise CheckpointError(f"{name}: entries that are not tensors: {others[:10]}")
    if not tensors:
        return {}, os.path.getsize(path)
    # Every storage is a slice of one mapping of the file: find the mapping's base address.
    ptrs = sorted({t.untyped_storage().data_ptr() for t in tensors.values() if t.untyped_storage().nbytes()})
    record_set = set(offsets)
    base = None
    for first in offsets:
        candidate = ptrs[0] - first
        if all(p - candidate in record_set for p in ptrs):
            base = candidate
            break
    if base is None:
        raise CheckpointError(f"{name}: cannot locate its tensors' storages in the file (not an mmap-able checkpoint)")
    size = os.path.getsize(path)
    entries = {}
    for key, t in tensors.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in TORCH_DTYPE_ITEMSIZE:
            raise CheckpointError(f"{name}: tensor {key!r} has unsupported dtype {dtype}")
        if not t.is_contiguous():
            raise CheckpointError(f"{name}: tensor {key!r} is stored as a non-contiguous view; convert the checkpoint to safetensors")
        start = t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size()
        end = start + t.numel() * t.element_size()
        if end > size:
            raise CheckpointError(f"{name}: tensor {key!r} ends at byte {end}, past the end of the file ({size} bytes)")
        entries[key] = TensorEntry(key, name, dtype, tuple(t.shape), start, end)
    return entries, size


def build_pickle_index(root: str, *, entry: str, weight_map: dict[str, str] | None) -> CheckpointIndex:
    """Index ``pytorch_model.bin`` (``weight_map`` None) or a sharded checkpoint, whose
    ``pytorch_model.bin.index.json`` (``entry``) maps tensors to files as ``weight_map`` (read by the caller)."""
    names = sorted(set(weight_map.values())) if weight_map is not None else [entry]
    tensors: dict[str, TensorEntry] = {}
    files = []
    for name in names:
        path = confined_path(root, name, what=entry)
        if not os.path.isfile(path):
            raise CheckpointError(f"{entry} references {name}, which does not exist in {root}")
        entries, size = _file_entries(path, name)
        for key, e in entries.items():
            if key in tensors:
                raise CheckpointError(f"tensor {key!r} appears in both {tensors[key].file} and {name}")
            tensors[key] = e
        files.append(CheckpointFile(name=name, size=size, header_size=0))
    if weight_map is not None:
        wrong = sorted(k for k, f in weight_map.items() if k not in tensors or tensors[k].file != f)
        if wrong:
            raise CheckpointError(f"{entry} disagrees with the shards for {len(wrong)} tensor(s): {wrong[:10]}")
    return CheckpointIndex(root=root, files=tuple(files), tensors=tensors, format="pickle")
