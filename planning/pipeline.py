"""Pipeline stages: which contiguous run of layers each stage holds.

The model's repeated-layer list (``Skeleton.layers_path``) is cut into ``pp`` contiguous runs; what
comes before it (embeddings) belongs to the first stage and what comes after (final norm, LM head) to
the last — the order the forward pass needs. The cut minimises the largest stage's bytes relative to
that stage's memory budget (an exact dynamic programme over layer boundaries), so uneven layers
(MoE, a large vocabulary on the first and last stage) still balance. An explicit ``device_map``
(module prefix → stage) overrides the cut and is checked for order and completeness.

Pure; runs on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from planning.errors import PlanError
from planning.skeleton import FirstLayerTrace, Skeleton


@dataclass(frozen=True, slots=True)
class StageLayout:
    """Layer ranges per stage and the stage of every tensor."""

    layer_ranges: tuple[tuple[int, int], ...]  # per stage, [start, stop) in the layer list
    stage_of: dict[str, int]


def layer_of(name: str, layers_path: str | None) -> int | None:
    if layers_path is None or not name.startswith(layers_path + "."):
        return None
    index = name[len(layers_path) + 1 :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _sections(skeleton: Skeleton) -> tuple[list[str], list[list[str]], list[str]]:
    """Tensor names before the layer list, per layer, and after it (state_dict order is module order)."""
    prefix, suffix = [], []
    layers: list[list[str]] = [[] for _ in range(skeleton.num_layers)]
    seen_layer = False
    for t in skeleton.tensors:
        i = layer_of(t.name, skeleton.layers_path)
        if i is not None:
            layers[i].append(t.name)
            seen_layer = True
        elif seen_layer:
            suffix.append(t.name)
        else:
            prefix.append(t.name)
    return prefix, layers, suffix


def assign_stages(
    skeleton: Skeleton,
    pp: int,
    *,
    tensor_bytes: dict[str, int],
    budgets: list[int | None] | None = None,
    device_map: dict[str, int] | None = None,
    trace: FirstLayerTrace | None = None,
) -> StageLayout:
    """Cut the model into ``pp`` stages (see module docstring). ``budgets[s]`` bounds stage ``s``'s bytes per rank.
    ``trace``: what the meta forward showed up to the first layer (``skeleton.trace_first_layer``)."""
    prefix, layers, suffix = _sections(skeleton)
    if pp == 1:
        return StageLayout(((0, len(layers)),), {t.name: 0 for t in skeleton.tensors})
    if skeleton.layers_path is None:
        raise PlanError(f"pp={pp}: {skeleton.class_name} has no repeated-layer list to split into stages")
    if trace is not None:
        _check_order(skeleton, pp, suffix, trace)
    if len(layers) < pp:
        raise PlanError(f"pp={pp} exceeds the number of layers ({len(layers)}) of {skeleton.class_name}")
    if device_map is not None:
        return _from_device_map(skeleton, pp, device_map, prefix, layers, suffix)

    cost = [sum(tensor_bytes[n] for n in names) for names in layers]
    head, tail = sum(tensor_bytes[n] for n in prefix), sum(tensor_bytes[n] for n in suffix)
    limits = [b if b else 1 for b in (budgets or [None] * pp)]
    cuts = _balanced_cuts(cost, pp, head, tail, limits)
    ranges = tuple(zip(cuts[:-1], cuts[1:]))
    stage_of = {n: 0 for n in prefix} | {n: pp - 1 for n in suffix}
    for s, (a, b) in enumerate(ranges):
        for i in range(a, b):
            for n in layers[i]:
                stage_of[n] = s
    return StageLayout(ranges, stage_of)


def _check_order(skeleton: Skeleton, pp: int, suffix: list[str], trace: FirstLayerTrace) -> None:
    """Stages follow the module order and hand on the hidden state only: refuse a module stored after the layer
    list but run before it (MPNet's ``encoder.relative_attention_bias``, whose output every layer of every stage
    uses), and layers that hand more than the hidden state to the next one (HY-V4's ``topk_indices``)."""
    if trace.extra_outputs:
        raise PlanError(
            f"pp={pp}: each layer of {skeleton.class_name} ({skeleton.layers_path}) hands {trace.extra_outputs} "
            f"tensor(s) besides the hidden state to the next layer, and pipeline stages pass on only the hidden "
            f"state. Use pp=1 (tp splits the model instead)"
        )
    early = sorted({n for n in suffix if any(n.startswith(m + ".") for m in trace.before or ())})
    if early:
        raise PlanError(
            f"pp={pp}: {skeleton.class_name} stores {early} after {skeleton.layers_path} but runs it before the first "
            f"layer, for every layer; pipeline stages cannot split it. Use pp=1 (tp splits the model instead)"
        )


def _balanced_cuts(cost: list[int], pp: int, head: int, tail: int, limits: list[int]) -> list[int]:
    """Boundaries 0 = c0 < c1 < ... < c_pp = n minimising max_s(bytes_s / limits[s]); every stage gets a layer."""
    n = len(cost)
    prefix_sum = [0]
    for c in cost:
        prefix_sum.append(prefix_sum[-1] + c)

    def load(s: int, a: int, b: int) -> float:
        extra = (head if s == 0 else 0) + (tail if s == pp - 1 else 0)
        return (prefix_sum[b] - prefix_sum[a] + extra) / limits[s]

    inf = float("inf")
    # best[s][b]: smallest max load placing layers [0, b) on stages 0..s
    best = [[inf] * (n + 1) for _ in range(pp)]
    back = [[0] * (n + 1) for _ in range(pp)]
    for b in range(1, n + 1):
        best[0][b] = load(0, 0, b)
    for s in range(1, pp):
        for b in range(s + 1, n + 1):
            for a in range(s, b):
                value = max(best[s - 1][a], load(s, a, b))
                if value < best[s][b]:
                    best[s][b], back[s][b] = value, a
    cuts, b = [n], n
    for s in range(pp - 1, 0, -1):
        b = back[s][b]
        cuts.append(b)
    cuts.append(0)
    return cuts[::-1]


def _from_device_map(
    skeleton: Skeleton, pp: int, device_map: dict[str, int], prefix: list[str], layers: list[list[str]], suffix: list[str]
) -> StageLayout:
    for key, stage in device_map.items():
        if not isinstance(stage, int) or not 0 <= stage < pp:
            raise PlanError(f"device_map[{key!r}] = {stage!r}: stages are integers in [0, {pp})")
    keys = sorted(device_map, key=len, reverse=True)

    def stage_for(name: str) -> int | None:
        for key in keys:
            if key == "" or name == key or name.startswith(key + "."):
                return device_map[key]
        return None

    stage_of, unplaced = {}, []
    for t in skeleton.tensors:
        s = stage_for(t.name)
        if s is None:
            unplaced.append(t.name)
        else:
            stage_of[t.name] = s
    if unplaced:
        raise PlanError(f"device_map places no stage for {len(unplaced)} tensor(s): {sorted(unplaced)[:20]}")
    bad = [n for n in prefix if stage_of[n] != 0] + [n for n in suffix if stage_of[n] != pp - 1]
    if bad:
        raise PlanError(
            f"device_map: tensors before the layer list must be on stage 0 and those after it on stage {pp - 1}; "
            f"misplaced: {sorted(bad)}"
        )
    layer_stage = []
    for i, names in enumerate(layers):
        stages = {stage_of[n] for n in names}
        if len(stages) > 1:
            raise PlanError(f"device_map splits layer {i} of {skeleton.layers_path} across stages {sorted(stages)}")
        layer_stage.append(stages.pop() if stages else (layer_stage[-1] if layer_stage else 0))
    if any(b < a for a, b in zip(layer_stage, layer_stage[1:])):
        raise PlanError(f"device_map: layer stages must not decrease along {skeleton.layers_path}: {layer_stage}")
    ranges = []
    for s in range(pp):
        idx = [i for i, st in enumerate(layer_stage) if st == s]
        if not idx:
            raise PlanError(f"device_map leaves stage {s} without layers")
        ranges.append((idx[0], idx[-1] + 1))
    return StageLayout(tuple(ranges), stage_of)
