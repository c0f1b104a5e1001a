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


def llama(path: str, *, tied: bool = True, shard: str | None = "20KB", seed: int = 0, **overrides) -> str:
    """Llama with GQA (4 query, 2 KV heads), vocab 101 (odd), 3 layers, several shards."""
    return family(path, "llama", seed=seed, shard=shard, tie_word_embeddings=tied, **overrides)


def reference(path: str, **kwargs):
    """The oracle: transformers' own from_pretrained model."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", "auto")
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def state_of(path: str, **kwargs) -> dict[str, torch.Tensor]:
    return reference(path, **kwargs).state_dict()


PROMPT = torch.tensor([[1, 5, 9, 33, 77, 100, 3, 4], [7, 8, 60, 61, 62, 11, 12, 13]])


def expected_outputs(model, *, max_new_tokens: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' single-process logits and greedy tokens for ``PROMPT``."""
    with torch.no_grad():
        logits = model(PROMPT).logits
    tokens = model.generate(PROMPT, max_new_tokens=max_new_tokens, do_sample=False)
    return logits, tokens


def assert_inference_matches(m, logits: torch.Tensor, tokens: torch.Tensor, *, atol: float = 1e-4) -> None:
    got = m.logits(PROMPT)
    assert got.shape == logits.shape, (got.shape, logits.shape)
    diff = (got.float() - logits.float()).abs().max().item()
    assert diff <= atol, f"logits differ from transformers by {diff} > {atol}"
    generated = m.generate(PROMPT, max_new_tokens=tokens.shape[1] - PROMPT.shape[1])
    assert torch.equal(generated, tokens), f"greedy tokens differ:\n{generated}\n{tokens}"


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order, and every tensor bit for bit equal (dtype included)."""
    assert list(got) == list(want), f"keys differ: {sorted(set(got) ^ set(want))}"
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensor(s) differ: {bad[:10]}"


def files_of(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def family_config(family: str):
    """A tiny config of ``family`` with the traits the TP/PP tests exercise."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4)
    if family == "qwen2":  # q/k/v biases
        return tf.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "gemma":  # scaled embeddings, tied, a single KV head
        return tf.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=8)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**COMMON, num_key_value_heads=2)
    if family == "mixtral":  # MoE: per-expert w1/w2/w3 in the checkpoint, fused 3-D experts in the model
        return tf.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    if family == "gpt2":  # Conv1D, tied, no TP plan in transformers
        return tf.GPT2Config(vocab_size=101, n_embd=32, n_layer=3, n_head=4, n_positions=128, initializer_range=0.2,
                             bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3", "mixtral", "gpt2")


def family(path: str, name: str, *, seed: int = 0, shard: str | None = "20KB", dtype=torch.float32, **overrides) -> str:
    from transformers import AutoModelForCausalLM

    config = family_config(name)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    return save(model, path, shard=shard)


def load_in_process(plan) -> tuple[dict[str, torch.Tensor], list]:
    """Run every rank of ``plan`` in this process (no Ray): the reassembled state and the rank reports."""
    paths = {f.name: os.path.join(plan.model.root, f.name) for f in plan.files}
    return _run_ranks(plan, {n.node: paths for n in plan.nodes})


def load_fetched(plan, paths_per_node: dict[int, dict[str, str]]) -> dict[str, torch.Tensor]:
    """Every rank of ``plan`` read, in this process, from its node's fetched files (``{node: {file: path}}``);
    the reassembled state."""
    return _run_ranks(plan, paths_per_node)[0]


def _run_ranks(plan, paths_per_node: dict[int, dict[str, str]]) -> tuple[dict[str, torch.Tensor], list]:
    from workers.assemble import assemble_state_dict
    from workers.rank_worker import RankWorker

    workers = [RankWorker(plan, r) for r in range(plan.world_size)]
    for w in workers:
        w.load(paths_per_node[w.rank_plan.node])
    for w in workers:
        for s in w.rank_plan.sends:
            workers[s.to_rank].receive_tied(w.tied_for(s.to_rank))
    reports = [w.finalize() for w in workers]
    return assemble_state_dict(plan, {w.rank: w.local_state() for w in workers}), reports


def rewrite(src: str, dst: str, fn) -> str:
    """Copy a checkpoint folder, passing its full state dict through ``fn`` (name → tensor) and saving one file."""
    import shutil

    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f.endswith(".json") and f != "model.safetensors.index.json":
            shutil.copy(os.path.join(src, f), dst)
    state = {}
    for f in files_of(src):
        state.update(load_file(os.path.join(src, f)))
    new = fn(state)
    save_file({k: v.contiguous() for k, v in new.items()}, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


# Dimensions that are whole 128-blocks (transformers' FP8 dequantization needs that); 2 query heads, 1 KV head.
FP8_LLAMA = dict(vocab_size=101, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=128, max_position_embeddings=128, initializer_range=0.2,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
# The same with 4 experts of 256 (Qwen3-30B-A3B-FP8's layout: experts stored one by one, each with its scales).
FP8_QWEN3_MOE = dict(FP8_LLAMA, intermediate_size=512, moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2)


def fp8_llama(path: str, **overrides) -> str:
    """A DeepSeek-V3/Qwen3-style FP8 Llama (see ``fp8_checkpoint``)."""
    import transformers as tf

    return fp8_checkpoint(path, tf.LlamaConfig(**{**FP8_LLAMA, **overrides}))


def fp8_qwen3_moe(path: str, **overrides) -> str:
    """An FP8 Qwen3-MoE, experts one by one as published (see ``fp8_checkpoint``)."""
    import transformers as tf

    return fp8_checkpoint(path, tf.Qwen3MoeConfig(**{**FP8_QWEN3_MOE, **overrides}))


def fp8_checkpoint(path: str, config, *, seed: int = 0, shard: str = "200KB") -> str:
    """A checkpoint laid out as the published FP8 ones: a seeded bf16 model written by ``save_pretrained`` (its
    names as published, MoE experts one by one), then every tensor of a module transformers' quantizer turns
    into ``FP8Linear``/``FP8Experts`` quantized by transformers' own ``Fp8Quantize`` (``FineGrainedFP8Config``'s
    128×128 blocks: a ``float8_e4m3fn`` weight and a float32 ``weight_scale_inv`` per block); the rest (embeddings,
    norms, router, LM head) stays bf16. Rewritten sharded, with an index, by huggingface_hub's ``save_torch_state_dict``."""
    import re

    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear, Fp8Quantize
    from transformers.quantizers.auto import AutoHfQuantizer

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    state = {}
    for f in files_of(path):
        state.update(load_file(os.path.join(path, f)))
        os.remove(os.path.join(path, f))
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        os.remove(os.path.join(path, "model.safetensors.index.json"))
    quantization = FineGrainedFP8Config()
    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=True)
    with torch.device("meta"):
        layout = AutoModelForCausalLM.from_config(config)
    quantizer.preprocess_model(layout)  # which modules transformers quantizes (not the LM head)
    converted = {n for n, m in layout.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}
    op = Fp8Quantize(quantizer)
    out = {}
    for name, tensor in state.items():
        module = re.sub(r"\.\d+\.\w+\.weight$", "", name) if ".experts." in name else name.removesuffix(".weight")
        out.update(op.convert({name: tensor}) if name.endswith(".weight") and module in converted else {name: tensor})
    save_torch_state_dict({k: v.contiguous() for k, v in out.items()}, path, max_shard_size=shard)
    config.quantization_config = quantization
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    return path
