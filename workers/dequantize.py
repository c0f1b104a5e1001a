"""A rank's quantized shards turned into the model's dtype, as transformers' ``dequantize`` option does.

With ``FineGrainedFP8Config(dequantize=True)`` transformers builds the plain model (``nn.Linear``
layers) and fills each weight with its FP8 bytes times their block scales (``Fp8Dequantize``). A rank
does the same with its own shard: it has read the FP8 bytes and the scales of exactly its blocks
(``planning.quantization.block_shard``), so transformers' own function applied to the shard gives the
rank's slice of transformers' dequantized weight, bit for bit. One weight at a time: the FP8 shard is
dropped as soon as its dequantized copy exists.

Runs on every rank, after the reads and before the local model is built.
"""

from __future__ import annotations

import torch

from planning.plan import LoadPlan, RankPlan
from planning.quantization import scale_owner


def dequantize_shards(
    plan: LoadPlan, rank_plan: RankPlan, tensors: dict[str, torch.Tensor], model: torch.nn.Module
) -> list[str]:
    """Replace every quantized weight in ``tensors`` by its dequantized value and drop its scales; returns the
    names of the scale tensors dropped. ``model`` is the plain meta model the values go into: as in
    ``from_pretrained``, each weight takes the dtype of the parameter it fills."""
    quantization = plan.quantization
    if quantization is None or not quantization.dequantize:
        return []
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    op = Fp8Dequantize(hf_quantizer=None)  # its conversion reads no quantizer state
    dropped = []
    for p in rank_plan.params:
        weight = scale_owner(p.name, quantization)
        if weight is None or p.name not in tensors or weight not in tensors:
            continue
        pair = {"weight": tensors[weight], "weight_scale_inv": tensors.pop(p.name)}
        tensors[weight] = op.convert(pair, full_layer_name=weight, model=model)[weight]
        dropped.append(p.name)
    return dropped
