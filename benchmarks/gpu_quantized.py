"""FP8 on a GPU: meshload's load of a pre-quantized checkpoint against transformers' quantized load.

``python -m benchmarks.gpu_quantized --dir /tmp/fp8-8b [--preset 8b|tiny] [--pp 1] [--out results.json]``

Writes a seeded random Llama-3.1-8B-shaped checkpoint quantized as DeepSeek-V3/Qwen3 publish theirs
(``FineGrainedFP8Config``: float8_e4m3fn weights, a float32 ``weight_scale_inv`` per 128×128 block, by
transformers' own ``Fp8Quantize``; embeddings, norms and LM head bf16) if absent, starts a one-node Ray
cluster with the GPU (as ``benchmarks.gpu_load`` does), then runs each method in a fresh process:

- ``transformers``: ``from_pretrained(path, device_map="cuda")`` — transformers' quantized load (``FP8Linear``);
- ``meshload``: ``orchestrator.load(path, device="cuda", pp=...)`` through Ray — the same modules on the rank(s);
- ``transformers-dequantized`` / ``meshload-dequantized``: both with ``FineGrainedFP8Config(dequantize=True)``.

Each reports its load seconds (the call alone, and from the process's launch), peak GPU memory, its
logits and greedy tokens for one prompt. FP8 matmuls need transformers' ``finegrained-fp8`` kernel
(the ``kernels`` package, fetched from the Hub): where it cannot be had, the FP8 rows report the error
of the forward and keep their load figures, and the dequantized rows still compare logits. Prints one
JSON object: per method its figures, and per pair (meshload vs transformers, same mode) the largest
logit difference, whether the logits are identical, and whether the greedy tokens are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.gpu_load import LLAMA_8B, start_cluster, stop_cluster
from orchestrator.random_checkpoint import random_llama

PROMPT = [[1, 306, 4658, 278, 6593, 310, 2834, 338, 29871, 1048, 278, 6593, 310, 2834, 29889, 13]]
NEW_TOKENS = 8
METHODS = ("transformers", "meshload", "transformers-dequantized", "meshload-dequantized")
# whole 128-blocks everywhere (transformers' FP8 quantizer leaves other shapes unquantized): 4 heads of 128, 2 KV heads
TINY_FP8 = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=128, max_position_embeddings=256, tie_word_embeddings=False)


def write(path: str, *, preset: str, device: str) -> None:
    """The FP8 checkpoint (see module docstring), quantized on ``device``, shards of 5 GB."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import FineGrainedFP8Config, LlamaConfig, LlamaForCausalLM
    from transformers.integrations.finegrained_fp8 import FP8Linear, Fp8Quantize
    from transformers.quantizers.auto import AutoHfQuantizer

    config = LlamaConfig(**{"8b": LLAMA_8B, "tiny": TINY_FP8}[preset], dtype="bfloat16")
    model = random_llama(config, device=device)
    with torch.device("meta"):
        layout = LlamaForCausalLM(config)
    quantization = FineGrainedFP8Config()
    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=True)
    quantizer.preprocess_model(layout)
    quantized = {f"{n}.weight" for n, m in layout.named_modules() if isinstance(m, FP8Linear)}
    op = Fp8Quantize(quantizer)
    state = {}
    for name, tensor in model.state_dict().items():
        out = op.convert({name: tensor}) if name in quantized else {name: tensor}
        state.update({k: v.contiguous().cpu() for k, v in out.items()})
    del model
    os.makedirs(path, exist_ok=True)
    save_torch_state_dict(state, path, max_shard_size="5GB" if preset == "8b" else "200KB")
    config.quantization_config = quantization
    config.save_pretrained(path)


RUN = r"""
import json, sys, time, torch
launched, method, path, address, pp, out, device = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7]
cuda = device == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
from transformers import FineGrainedFP8Config
prompt = torch.tensor(%r)
dequantize = method.endswith("-dequantized")
quant = FineGrainedFP8Config(dequantize=True) if dequantize else None
row = {"method": method}
t0 = time.time()
if method.startswith("transformers"):
    from transformers import AutoModelForCausalLM
    kw = {"quantization_config": quant} if quant else {}
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device, **kw).eval()
    sync()
    row["load_call_s"], row["launch_to_weights_s"] = time.time() - t0, time.time() - launched
    row["fp8_modules"] = sum(type(m).__name__ == "FP8Linear" for m in model.modules())
    def run():
        with torch.inference_mode():
            logits = model(prompt.to(device)).logits.float().cpu()
            tokens = model.generate(prompt.to(device), max_new_tokens=%d, do_sample=False).cpu()
        return logits, tokens
    peak = lambda: torch.cuda.max_memory_allocated() if cuda else 0
else:
    import orchestrator
    kw = {"quantization": quant} if quant else {}
    share = {"gpus_per_rank": 0.5} if pp > 1 and cuda else {}
    m = orchestrator.load(path, device=device, pp=pp, address=address, progress=False, plan_cache=False, **share, **kw)
    row["load_call_s"], row["launch_to_weights_s"] = time.time() - t0, time.time() - launched
    row["bytes_read"] = sum(r.bytes_read for r in m.report)
    row["planned_read_bytes"] = sum(r.read_bytes for r in m.plan.ranks)
    def run():
        return m.logits(prompt).float(), m.generate(prompt, max_new_tokens=%d)
    peak = lambda: max(r.peak_device_bytes for r in m.report)
try:
    logits, tokens = run()
    torch.save({"logits": logits, "tokens": tokens}, out)
    row["tokens"] = tokens.tolist()
except Exception as exc:  # e.g. no finegrained-fp8 kernel on this machine
    row["forward_error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
row["peak_gpu_bytes"] = peak()
print("RESULT " + json.dumps(row))
if not method.startswith("transformers"):
    m.shutdown()
""" % (PROMPT, NEW_TOKENS, NEW_TOKENS)


def launch(method: str, path: str, *, address: str, pp: int, out: str, device: str, timeout_s: float) -> dict:
    cmd = [sys.executable, "-c", RUN, repr(time.time()), method, path, address, str(pp), out, device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout_s:g}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"method": method, "error": (proc.stderr or proc.stdout)[-3000:]}
    return json.loads(lines[-1][len("RESULT "):])


def compare(a: str, b: str) -> dict:
    import torch

    if not (os.path.isfile(a) and os.path.isfile(b)):
        return {"error": "a side has no logits (see its forward_error)"}
    x, y = torch.load(a), torch.load(b)
    return {"logits_max_abs_diff": float((x["logits"] - y["logits"]).abs().max()),
            "logits_equal": bool(torch.equal(x["logits"], y["logits"])),
            "argmax_agree": float((x["logits"].argmax(-1) == y["logits"].argmax(-1)).float().mean()),
            "tokens_equal": bool(torch.equal(x["tokens"], y["tokens"]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/fp8-8b", help="checkpoint folder (written if absent)")
    ap.add_argument("--preset", default="8b", choices=["8b", "tiny"])
    ap.add_argument("--pp", type=int, default=1, help="meshload's pipeline stages (they share the GPU)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of this script (no FP8 matmuls there)")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    t0 = time.time()
    write(args.dir, preset=args.preset, device=args.device)
    results = {"checkpoint": args.dir, "preset": args.preset, "pp": args.pp, "device": args.device, "write_s": time.time() - t0,
               "checkpoint_bytes": sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir)
                                       if f.endswith(".safetensors")), "runs": {}, "compare": {}}
    address = start_cluster(args.device)
    try:
        for method in METHODS:
            out = os.path.join(args.dir, f"out-{method}.pt")
            if os.path.exists(out):
                os.remove(out)
            results["runs"][method] = launch(method, args.dir, address=address, pp=args.pp, out=out, device=args.device,
                                             timeout_s=args.timeout_s)
    finally:
        stop_cluster()
    for mode in ("", "-dequantized"):
        results["compare"][f"meshload{mode} vs transformers{mode}"] = compare(
            os.path.join(args.dir, f"out-meshload{mode}.pt"), os.path.join(args.dir, f"out-transformers{mode}.pt"))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
