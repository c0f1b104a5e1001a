"""The one writer of seeded random Llama checkpoints for the demo, the CLI's ``bench`` and ``benchmarks/``.

A model of any size built on the meta device, materialised empty and filled per tensor from N(0, 0.02)
with one seeded generator (no fp32 copy, no ``init_weights`` pass: a 8B model is written in seconds),
then written by transformers' own ``save_pretrained``. The same seed, shape and dtype give the same
bytes, so a folder written once is reused (the tests' tiny checkpoints are ``tests/checkpoints.py``).

Runs on the driver (or a benchmark's own process); no Ray.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


def random_llama(config: LlamaConfig, *, dtype: str = "bfloat16", device: str = "cpu", seed: int = 0) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` of ``config`` on ``device`` in ``dtype``, every parameter drawn from N(0, 0.02)
    with generator seed ``seed``."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(getattr(torch, dtype))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model


def write_random_llama(
    path: str | os.PathLike,
    *,
    config: dict,
    max_shard_size: str,
    dtype: str = "bfloat16",
    device: str = "cpu",
    seed: int = 0,
) -> str:
    """Write a seeded random Llama of ``config`` (``LlamaConfig`` keyword arguments) into ``path`` unless a
    finished one is there (its weights file or index, written after ``config.json``); returns ``path``."""
    from transformers import LlamaConfig

    path = os.fspath(path)
    if any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors.index.json", "model.safetensors")):
        return path
    model = random_llama(LlamaConfig(**config), dtype=dtype, device=device, seed=seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path

