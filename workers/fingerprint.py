"""An order-independent digest of a tensor's bytes, computed where the tensor lives (GPU or CPU).

What it is for: checking that a load put exactly the checkpoint's bytes on a device without moving
them anywhere — a benchmark compares every tensor of a 16 GB load on the GPU against the file's, and
a user can compare ranks against a reference — where ``torch.equal`` would need both tensors in one
process. The digest is a sum of the tensor's 64-bit words, each times a distinct odd weight, in
wrapping integer arithmetic: exact and the same whatever order a device reduces in, and changed by
any change to a single word.

Runs on every rank (``RankWorker.fingerprints``) and in benchmarks.
"""

from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer


def fingerprint(tensor: torch.Tensor) -> int:
    """The digest of ``tensor``'s bytes (its dtype and shape are not part of it; compare those apart)."""
    data = tensor.detach().contiguous().view(-1).view(torch.uint8)
    pad = (-data.numel()) % 8
    if pad:
        data = torch.cat([data, data.new_zeros(pad)])
    words = data.view(torch.int64)
    weights = torch.arange(words.numel(), device=words.device, dtype=torch.int64).mul_(_GOLDEN).bitwise_or_(1)
    return int(words.mul(weights).sum())
