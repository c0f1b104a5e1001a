"""The plan of a loaded model, re-made against another checkpoint of the same model (``update_weights``).

A training or RL run saves the next step of the weights: the same architecture, the same tensor names,
shapes and dtypes, other values — often in other files, at other offsets. The ranks already hold
storage of the right shape for every tensor, cut the right way; what changes is only where each read
comes from. So the new plan keeps every rank's parameters (shapes, shards, ties, stages) and takes
each read's file and offset from the new checkpoint's index, refusing — naming the tensor, the rank
and the values — any difference that a fresh load of the new checkpoint would plan otherwise:

- another config (``transformers_version`` aside): the model would be built differently;
- a tensor the plan reads that the checkpoint lacks, or holds at another shape or dtype;
- a checkpoint tensor the plan neither reads nor reports as not loaded (``keys.unexpected`` /
  ``keys.ignored``): a fresh load would use it (a tensor that was initialised, the other side of a tie).

The result then passes the same checks as any plan given to ``load``: ``planning.validate`` (the plan
agrees with itself) and ``planning.plan_check`` (with the checkpoint as resolved: files, headers, every
read's offset, dtype and shape).

Pure: it takes the resolved checkpoint (``planning.planner.ResolvedModel``); runs on the driver.
"""

from __future__ import annotations

from dataclasses import replace

from planning.errors import PlanError
from planning.build import node_plans
from planning.plan import LoadPlan
from planning.plan_check import check_plan_matches
from planning.validate import validate_plan

CONFIG_KEYS_THAT_MAY_DIFFER = frozenset({"transformers_version"})  # written by save_pretrained, no effect on the model


def retarget_plan(plan: LoadPlan, resolved) -> LoadPlan:
    """``plan`` with every read taken from ``resolved`` (see module docstring); ``PlanError`` if it cannot be."""
    where = f"{resolved.ref_source!r} cannot replace the weights of {plan.model.source!r}"
    old_config = {k: v for k, v in plan.model.config.items() if k not in CONFIG_KEYS_THAT_MAY_DIFFER}
    new_config = {k: v for k, v in resolved.config_dict.items() if k not in CONFIG_KEYS_THAT_MAY_DIFFER}
    if old_config != new_config:
        keys = sorted(k for k in set(old_config) | set(new_config) if old_config.get(k) != new_config.get(k))
        values = ", ".join(f"{k}: {old_config.get(k)!r} -> {new_config.get(k)!r}" for k in keys[:8])
        raise PlanError(f"{where}: its config.json differs in {keys} ({values}); load it instead")
    tensors = resolved.index.tensors
    problems: list[str] = []
    ranks = []
    for r in plan.ranks:
        params = []
        for p in r.params:
            reads = []
            for item in p.reads:
                entry = tensors.get(item.tensor)
                if entry is None:
                    problems.append(f"rank {r.rank}, {p.name}: tensor {item.tensor!r} is not in the checkpoint")
                elif tuple(entry.shape) != tuple(item.src_shape) or entry.dtype != item.src_dtype:
                    problems.append(
                        f"rank {r.rank}, {p.name}: tensor {item.tensor!r} is {entry.dtype} {list(entry.shape)}, "
                        f"the loaded model's was {item.src_dtype} {list(item.src_shape)}"
                    )
                else:
                    reads.append(replace(item, file=entry.file, file_offset=entry.start))
            params.append(replace(p, reads=tuple(reads)))
        ranks.append(replace(r, params=tuple(params)))
    read = {item.tensor for r in plan.ranks for p in r.params for item in p.reads}
    unused = sorted(set(tensors) - read - set(plan.keys.unexpected) - set(plan.keys.ignored))
    if unused:
        problems.append(f"tensor(s) {unused[:8]} would be loaded by a fresh load but are not part of the loaded model's plan")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise PlanError(f"{where}: " + "; ".join(problems[:8]) + more)
    ranks = tuple(ranks)
    model = replace(
        plan.model, source=str(resolved.ref_source), kind=resolved.kind, root=resolved.root, revision=resolved.revision,
        config=resolved.config_dict, checkpoint_format=resolved.index.format,
    )
    new = replace(
        plan, model=model, ranks=ranks, nodes=node_plans(ranks, plan.num_nodes, resolved.index), files=resolved.index.files,
        totals=replace(plan.totals, checkpoint_bytes=resolved.index.total_bytes),
    )
    validate_plan(new)
    check_plan_matches(new, resolved)
    return new
