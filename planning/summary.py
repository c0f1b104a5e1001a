"""Human-readable views of a ``LoadPlan``: the per-rank table and the totals a cluster is sized by.

Pure; used by ``meshload plan`` and ``meshload load``.
"""

from __future__ import annotations

import math

from planning.offload import layer_tiers, stream_bytes, tier_bytes
from planning.plan import LoadPlan, RankPlan
from planning.quantization import scale_owner


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}T"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def quantized_bytes(plan: LoadPlan, rank: RankPlan) -> tuple[int, int]:
    """(bytes of quantized weights, bytes of their scales) that ``rank`` reads, as the checkpoint stores them."""
    weights = scales = 0
    for p in rank.params:
        owner = scale_owner(p.name, plan.quantization)
        if owner is not None:
            scales += sum(i.nbytes for i in p.reads)
            weights += sum(i.nbytes for q in rank.params if q.name == owner for i in q.reads)
    return weights, scales


def rank_table(plan: LoadPlan) -> str:
    rows = []
    for r in plan.ranks:
        stage = plan.stages[r.stage]
        rows.append(
            [
                str(r.rank),
                str(r.node),
                str(r.stage),
                str(r.tp_rank),
                f"{stage.layer_start}-{stage.layer_stop - 1}" if stage.layer_stop > stage.layer_start else "-",
                human_count(r.num_parameters),
                human_bytes(r.param_bytes),
                human_bytes(r.read_bytes),
                *(human_bytes(n) for n in (quantized_bytes(plan, r) if plan.quantization else ())),
                str(len(r.files)),
            ]
        )
    quantized = [f"{plan.quantization.method} weights", "scales"] if plan.quantization else []
    return table(["rank", "node", "stage", "tp", "layers", "params", "bytes", "reads", *quantized, "files"], rows)


def node_read_bytes(plan: LoadPlan, node: int) -> int:
    """Bytes a node's ranks read, each byte once (ranks replicating a tensor read the same bytes), plus the
    headers of the files they touch: what a node fetches in exact byte-range mode (``planning.fetch_list``)."""
    from planning.fetch_list import node_fetch_items

    return sum(i.nbytes for i in node_fetch_items(plan, node, mode="ranges", max_gap_bytes=0, whole_above=math.inf))


def totals_text(plan: LoadPlan) -> str:
    t = plan.totals
    per_rank = [r.param_bytes for r in plan.ranks]
    fetch = [node_read_bytes(plan, n.node) for n in plan.nodes]
    held = {p.dtype for r in plan.ranks for p in r.params if not p.is_buffer}  # a quantized checkpoint: several
    dtypes = " + ".join([plan.dtype] + sorted(held - {plan.dtype})) if plan.quantization else plan.dtype
    lines = [
        f"model          {plan.model.class_name} ({plan.model.model_type}) from {plan.model.source}",
        f"topology       tp={plan.tp} pp={plan.pp} nodes={plan.num_nodes} -> {plan.world_size} ranks, dtype={plan.dtype}, device={plan.device}",
        f"parameters     {human_count(t.num_parameters)} ({t.num_parameters:,})",
        f"weights        {human_bytes(t.param_bytes)} in {dtypes}; checkpoint {human_bytes(t.checkpoint_bytes)} in {len(plan.files)} file(s)",
        f"per rank       max {human_bytes(max(per_rank))}, min {human_bytes(min(per_rank))} of parameters",
        f"per node       fetches max {human_bytes(max(fetch))} (only the byte ranges its ranks read)",
        f"forward        ~{human_count(t.flops_per_token)}FLOPs per token (2 x parameters used per token; attention scores not counted)",
    ]
    q = plan.quantization
    if q is not None:
        weights, scales = (sum(x) for x in zip(*(quantized_bytes(plan, r) for r in plan.ranks)))
        block = "x".join(map(str, q.block)) if q.block else "per tensor"
        held = f"dequantized to {plan.dtype} on each rank" if q.dequantize else "held quantized on the ranks"
        lines.insert(3, f"quantized      {q.method}, blocks {block}: ranks read {human_bytes(weights)} of quantized weights "
                        f"+ {human_bytes(scales)} of scales (all ranks), {held}")
    return "\n".join(lines)


def layer_ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"``; ``"-"`` for none."""
    out: list[str] = []
    for i in layers:
        if out and int(out[-1].rpartition("-")[2]) == i - 1:
            out[-1] = f"{out[-1].partition('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out) or "-"


def offload_table(plan: LoadPlan) -> str | None:
    """Per rank: which layers live on its device, in host memory and on disk, with the bytes of each (the device's
    including the room to stream two offloaded layers); None when nothing is offloaded."""
    if not any(p.offload for r in plan.ranks for p in r.params):
        return None
    rows = []
    for r in plan.ranks:
        where = layer_tiers(r, plan.layers_path)
        streamed = stream_bytes(r, plan.layers_path)
        device = human_bytes(tier_bytes(r, None)) + (f" + {human_bytes(streamed)} streamed" if streamed else "")
        budget = plan.budgets[r.rank]
        rows.append([
            str(r.rank), str(r.stage), str(r.tp_rank),
            layer_ranges(where["device"]), device, human_bytes(budget) if budget is not None else "-",
            layer_ranges(where["cpu"]), human_bytes(tier_bytes(r, "cpu")),
            layer_ranges(where["disk"]), human_bytes(tier_bytes(r, "disk")),
        ])
    return table(["rank", "stage", "tp", "device layers", "device bytes", "budget", "cpu layers", "cpu bytes",
                  "disk layers", "disk bytes"], rows)
