"""Float8 tensors across Ray: shipped as bytes, viewed back with the dtype the plan names.

torch 2.13 cannot unpickle a float8 tensor (``float8_e4m3fn``, ``float8_e8m0fnu``, ...: its storage
unpickler asks ``UntypedStorage`` for a dtype and fails), and Ray pickles the tensors a rank returns
(``local_state``) or hands to another stage (tied tensors). A float8 tensor therefore leaves a rank as a
``uint8`` view of the same bytes, and the receiver views it back as the plan's dtype: nothing is
converted, so the bytes arrive bit for bit.

Runs on every rank (sending) and on the driver or the receiving rank.
"""

from __future__ import annotations

import torch

from planning.skeleton import parse_dtype


def _unpicklable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def to_wire(t: torch.Tensor) -> torch.Tensor:
    """``t`` as Ray can pickle it: a float8 tensor as a ``uint8`` view of its bytes, anything else as is."""
    return t.view(torch.uint8) if _unpicklable(t.dtype) else t


def from_wire(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Undo ``to_wire`` for a tensor the plan says is ``dtype`` (a dequantized one arrives in its own dtype)."""
    want = parse_dtype(dtype)
    return t.view(want) if t.dtype == torch.uint8 and _unpicklable(want) else t
