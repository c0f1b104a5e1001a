"""Write a checkpoint of real safetensors headers over sparse (hole-only) data, for planning at scale.

The files have their true sizes but no data blocks on disk, so a Llama-3.1-405B-shaped checkpoint
(~810 GB, 191 shards) costs a few megabytes. Only planning can use it: the weights read as zeros.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

from planning.safetensors_header import DTYPES

LLAMA_405B = dict(
    vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
    num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
)


def write_sparse_checkpoint(path: str, config_kwargs: dict, *, shard_bytes: int = 5 * 10**9) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(path, exist_ok=True)
    config = LlamaConfig(**config_kwargs)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    code = {v[0]: k for k, v in DTYPES.items()}
    shards, current, size = [], [], 0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(t.shape), nbytes))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape, nbytes in tensors:
            header[name] = {"dtype": code["bfloat16"], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(path, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(n for s in shards for *_, n in s)}, "weight_map": weight_map}, f)
    return path
