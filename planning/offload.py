"""Offload: which of a rank's tensors live on its device, in host memory ("cpu") or on disk ("disk").

transformers' ``from_pretrained(device_map=..., max_memory=...)`` puts each module on a GPU, the CPU or
disk and streams offloaded weights to the GPU for the forward (accelerate's hooks). meshload does the
same per rank, inside the rank's pipeline stage and TP shard:

- ``max_memory`` keeps its per-rank meaning (a device budget: ``"40GiB"``, bytes, ``{rank: budget}``) and
  also takes transformers' per-device spelling — ``{"cuda": "20GiB", "cpu": "64GiB"}`` for every rank, or
  ``{rank: {...}}`` per rank (``"device"`` names the rank's device whatever it is; with ``device="cpu"``
  it is the only way to budget the device, since ``"cpu"`` is the host tier). Sizes are parsed by
  accelerate's ``convert_file_size_to_int``, as transformers parses them. With the per-device spelling,
  what does not fit the device is offloaded instead of refused: layer by layer, in order, the device
  is filled first, then host memory up to the ``"cpu"`` budget (none without one), then disk, which is
  not budgeted — a disk-offloaded tensor is a map of the checkpoint's own bytes.
- ``device_map`` keeps mapping module prefixes to pipeline stages (ints) and also takes ``"cpu"`` and
  ``"disk"`` (and ``"device"`` or the device's name, to keep a prefix on the device inside an offloaded
  one): the longest matching prefix decides. These placements are fixed; the budgets place the rest.

Only the repeated layers (``Skeleton.layers_path``) are offloaded: the forward streams one layer at a
time to the device, prefetching the next offloaded layer while the current one computes, so the device
needs room for two offloaded layers besides what stays on it (``stream_bytes``). Embeddings, the final
norm and the head run for every token and stay on the device.

Pure; runs on the driver (planning) and wherever a plan is validated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planning.errors import PlanError
from planning.pipeline import layer_of
from planning.plan import RankPlan

TIERS = ("cpu", "disk")  # ParamPlan.offload values; None: on the rank's device


@dataclass(frozen=True, slots=True)
class RankBudget:
    """One rank's budgets, in bytes. ``device``: parameters on the device (None: unbounded). ``cpu``: host
    memory for offloaded tensors (None: none offloaded there automatically). ``spill``: whether what
    does not fit the device is offloaded (max_memory in the per-device spelling) or refused."""

    device: int | None = None
    cpu: int | None = None
    spill: bool = False


def parse_size(value, *, what: str) -> int | None:
    """``"40GiB"``, ``"40GB"``, ``"512MiB"``, ``"1.5GiB"``, bytes as an int or a string of digits; None stays None.
    Units are parsed by accelerate's ``convert_file_size_to_int`` (what transformers' ``max_memory`` goes through)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PlanError(f"{what}: cannot read {value!r} as a size; use bytes or e.g. '40GiB'")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise PlanError(f"{what}: {value} bytes is negative")
        return value
    from accelerate.utils.modeling import convert_file_size_to_int

    text = value.strip()
    for unit, scale, smaller in (("TIB", 1024, "GiB"), ("TB", 1000, "GB")):  # accelerate's parser stops at GiB/GB
        if text.upper().endswith(unit) and not text.endswith("b"):
            try:
                text = f"{float(text[: -len(unit)]) * scale}{smaller}"
            except ValueError:
                pass  # refused below, as accelerate refuses it
            break
    try:
        return convert_file_size_to_int(text)
    except ValueError:
        raise PlanError(f"{what}: cannot read {value!r} as a size; use bytes or e.g. '40GiB', '512MiB', '1.5GB'") from None


def rank_budgets(max_memory, world_size: int, *, device: str = "cpu") -> list[RankBudget]:
    """Every rank's ``RankBudget`` from ``max_memory`` (see module docstring)."""
    if not isinstance(max_memory, dict):
        return [RankBudget(parse_size(max_memory, what="max_memory"))] * world_size
    ranks = [k for k in max_memory if isinstance(k, int) and not isinstance(k, bool)]
    if not ranks:
        return [_tiers(max_memory, device=device, what="max_memory")] * world_size
    unknown = sorted((k for k in max_memory if k not in ranks or not 0 <= k < world_size), key=repr)
    if unknown:
        raise PlanError(
            f"max_memory keys must be ranks in [0, {world_size}) or devices {_device_keys(device)} + ['cpu'], "
            f"not both; got {unknown}"
        )
    out = []
    for r in range(world_size):
        value = max_memory.get(r)
        what = f"max_memory[{r}]"
        out.append(_tiers(value, device=device, what=what) if isinstance(value, dict) else RankBudget(parse_size(value, what=what)))
    return out


def _device_keys(device: str) -> list[str]:
    return ["device", "cuda"] if device == "cuda" else ["device"]


def _tiers(spec: dict, *, device: str, what: str) -> RankBudget:
    keys = _device_keys(device)
    unknown = sorted((k for k in spec if k not in (*keys, "cpu")), key=repr)
    if unknown:
        hint = ""
        if "disk" in unknown:
            hint = " (disk is not budgeted: a disk-offloaded tensor maps the checkpoint's own bytes)"
        elif "cuda" in unknown:
            hint = f" ('cuda' budgets a GPU, and this plan's device is {device!r}; 'device' budgets the rank's device)"
        raise PlanError(f"{what}: unknown key(s) {unknown}; expected {keys + ['cpu']}{hint}")
    given = [k for k in keys if k in spec]
    if len(given) > 1:
        raise PlanError(f"{what}: {given} both name the rank's device; give one")
    device_budget = parse_size(spec[given[0]], what=f"{what}[{given[0]!r}]") if given else None
    return RankBudget(device=device_budget, cpu=parse_size(spec.get("cpu"), what=f"{what}['cpu']"), spill=True)


def split_device_map(device_map: dict | None, *, device: str) -> tuple[dict[str, int] | None, dict[str, str | None]]:
    """``device_map`` → (module prefix → stage, or None when it names no stage; module prefix → tier or None for
    the device). Values other than stage ints, "cpu", "disk", "device" and the device's name are refused."""
    if device_map is None:
        return None, {}
    stages, tiers = {}, {}
    for key, value in device_map.items():
        if not isinstance(key, str):
            raise PlanError(f"device_map keys are module prefixes (strings), got {key!r}")
        if isinstance(value, str):
            if value in TIERS:
                tiers[key] = value
            elif value in _device_keys(device) or value == device:
                tiers[key] = None
            else:
                raise PlanError(
                    f"device_map[{key!r}] = {value!r}: expected a stage index, 'cpu', 'disk' or the rank's device "
                    f"({_device_keys(device)}, device={device!r})"
                )
        else:
            stages[key] = value  # checked by planning.pipeline
    return stages or None, tiers


def _longest_prefix(name: str, table: dict) -> str | None:
    best = None
    for key in table:
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return best


def place_rank(rank_plan: RankPlan, *, budget: RankBudget, tiers: dict[str, str | None], layers_path: str | None) -> RankPlan:
    """``rank_plan`` with each parameter's ``offload`` set (see module docstring), or a ``PlanError`` naming the
    rank, its budgets and what does not fit."""
    if not tiers and (budget.device is None or rank_plan.param_bytes <= budget.device):
        return rank_plan  # everything fits its device: nothing to place
    where = f"rank {rank_plan.rank} (stage {rank_plan.stage}, tp rank {rank_plan.tp_rank})"
    tier: dict[str, str] = {}  # placed off the device: by the device_map now, by the budgets below
    free: dict[int, list] = {}  # per layer: the tensors the budgets place (no device_map entry)
    for p in rank_plan.params:
        key = _longest_prefix(p.name, tiers)
        i = layer_of(p.name, layers_path)
        if key is not None and tiers[key] is not None and i is None:
            raise PlanError(
                f"device_map[{key!r}] = {tiers[key]!r} places {p.name} off the device; only the layers of "
                f"{layers_path or 'the repeated-layer list (this model has none)'} can be offloaded (embeddings, "
                f"final norm and head run for every token and stay on the device)"
            )
        if not p.owns_storage or p.receive_from is not None or i is None:
            continue  # aliases follow their owner; a tensor sent by another stage stays where it lands
        if key is None:
            free.setdefault(i, []).append(p)
        elif tiers[key] is not None:
            tier[p.name] = tiers[key]
    fixed: dict[int, int] = {}  # per layer: bytes the device_map offloads
    for p in rank_plan.params:
        if p.name in tier:
            i = layer_of(p.name, layers_path)
            fixed[i] = fixed.get(i, 0) + p.nbytes
    free_bytes = {i: sum(p.nbytes for p in ps) for i, ps in free.items()}
    on_device = sum(p.nbytes for p in rank_plan.params if p.owns_storage and p.name not in tier)
    staying = on_device - sum(free_bytes.values())  # on the device whatever the budgets say
    streamed = 2 * max(fixed.values(), default=0)
    if budget.device is not None and on_device + streamed > budget.device:
        if not budget.spill:
            stream = f" on its device plus {streamed} to stream two offloaded layers" if streamed else ""
            raise PlanError(
                f"{where} needs {on_device} bytes of parameters{stream}, above its max_memory of "
                f"{budget.device} bytes; add ranks (tp/pp), raise the budget, or give max_memory per device "
                f"({{'cuda': ..., 'cpu': ...}}) to offload the rest"
            )
        _spill(where, tier, free, free_bytes, fixed, staying, budget, layers_path)
    out = []
    for p in rank_plan.params:
        t = tier.get(p.alias_of if p.alias_of is not None else p.name)
        out.append(replace(p, offload=t) if t != p.offload else p)
    placed = replace(rank_plan, params=tuple(out))
    cpu = tier_bytes(placed, "cpu")
    if budget.cpu is not None and cpu > budget.cpu:
        raise PlanError(f"{where}: device_map offloads {cpu} bytes to 'cpu', above its max_memory['cpu'] of {budget.cpu} bytes")
    return placed


def _spill(where, tier, free, free_bytes, fixed, staying, budget: RankBudget, layers_path) -> None:
    """Fill the device with whole layers in order, then host memory up to its budget, then disk (into ``tier``)."""
    per_layer = {i: free_bytes.get(i, 0) + fixed.get(i, 0) for i in {*free_bytes, *fixed}}
    if not per_layer:
        raise PlanError(
            f"{where} needs {staying} bytes of parameters on its device, above its budget of {budget.device} bytes, "
            f"and holds no layer of a repeated-layer list ({layers_path}) to offload; add ranks (tp/pp) or raise the budget"
        )
    layer = max(per_layer, key=per_layer.get)
    largest = per_layer[layer]  # the most a layer can have to stream
    if largest > budget.device:
        raise PlanError(
            f"{where}: layer {layer} of {layers_path} needs {largest} bytes on the device while it runs, above the "
            f"device budget of {budget.device} bytes (no placement fits it); add tp ranks to split the layer, or "
            f"raise the budget"
        )
    room = budget.device - staying - 2 * largest
    if room < 0:
        raise PlanError(
            f"{where}: nothing fits its device budget of {budget.device} bytes: {staying} bytes stay on the device "
            f"(embeddings, final norm, head) and streaming needs room for two layers (2 x {largest} bytes)"
        )
    cpu_left = budget.cpu or 0
    on_device = True
    for i in sorted(free):
        size = free_bytes[i]
        if on_device and size <= room:
            room -= size
            continue
        on_device = False  # layer by layer, in order: once a layer leaves the device, the later ones do too
        chosen = "cpu" if size <= cpu_left else "disk"
        if chosen == "cpu":
            cpu_left -= size
        for p in free[i]:
            tier[p.name] = chosen


def tier_bytes(rank_plan: RankPlan, tier: str | None) -> int:
    """Bytes of storage ``rank_plan`` holds on its device (``tier=None``), in host memory ("cpu") or on disk."""
    return sum(p.nbytes for p in rank_plan.params if p.owns_storage and p.offload == tier)


def offloaded_layers(rank_plan: RankPlan, layers_path: str | None) -> dict[int, dict[str, int]]:
    """Per offloaded layer of ``rank_plan``: bytes per tier ("cpu", "disk")."""
    out: dict[int, dict[str, int]] = {}
    for p in rank_plan.params:
        if p.offload is not None and p.owns_storage:
            per = out.setdefault(layer_of(p.name, layers_path), {})
            per[p.offload] = per.get(p.offload, 0) + p.nbytes
    return out


def stream_bytes(rank_plan: RankPlan, layers_path: str | None) -> int:
    """Device room the forward needs to stream offloaded layers: two layers (the running one and the prefetched
    next one), each the largest's offloaded bytes; 0 when nothing is offloaded."""
    layers = offloaded_layers(rank_plan, layers_path)
    return 2 * max((sum(t.values()) for t in layers.values()), default=0)


def layer_tiers(rank_plan: RankPlan, layers_path: str | None) -> dict[str, list[int]]:
    """Which layers of ``rank_plan`` live where: "device" (every tensor on the device), "cpu", "disk" (a layer
    with tensors in both counts under each), in order."""
    offloaded = offloaded_layers(rank_plan, layers_path)
    held = sorted({i for p in rank_plan.params if (i := layer_of(p.name, layers_path)) is not None})
    out: dict[str, list[int]] = {"device": [], "cpu": [], "disk": []}
    for i in held:
        tiers = offloaded.get(i, {})
        if not tiers:
            out["device"].append(i)
        for t in tiers:
            out[t].append(i)
    return out
