"""Tiny checkpoints written by transformers' own ``save_pretrained``, for tests and the demo.

Sizes are small (hidden 32) but the shapes exercise what matters: several shards, an odd vocabulary
(not divisible by 2 or 4), GQA, tied and untied heads. Seeds make every write identical.
"""

from __future__ import annotations

import os

import torch


def save(model, path: str, *, shard: str | None = "20KB") -> str:
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def llama(path: str, *, tied: bool = True, vocab: int = 101, layers: int = 3, heads: int = 4, kv_heads: int = 2,
          hidden: int = 32, intermediate: int = 48, dtype=torch.float32, shard: str | None = "20KB", seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).to(dtype)
    return save(model, path, shard=shard)


def state_of(path: str, **kwargs) -> dict[str, torch.Tensor]:
    """The oracle: transformers' own from_pretrained state dict."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", "auto")
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).state_dict()


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order, and every tensor bit for bit equal (dtype included)."""
    assert list(got) == list(want), f"keys differ: {sorted(set(got) ^ set(want))}"
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensor(s) differ: {bad[:10]}"


def files_of(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
