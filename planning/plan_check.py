"""Does a plan belong to the checkpoint it names? Checked before anything runs.

A plan that was not made by this process a moment ago — one read back with ``planning.plan_json.plan_from_json``, or
found in the plan cache (a folder that other users may be able to write) — names a location, files and
byte ranges that ranks will open and node fetchers will create and delete. ``planning.validate`` checks
that such a plan agrees with itself and that its names are well formed; this module checks that it
agrees with the checkpoint as resolved now (headers read again from the folder, the Hub, or the cache):

- the same location: kind, folder (or remote reference and pinned version: a Hub commit, an object-store
  fingerprint), format;
- the same files: name, size, header size, header digest, sha256 and git blob id, every one of them;
- every read of a tensor at the file, offset, dtype and shape that the file's header gives it.

Resolving a checkpoint confines each of its files (``planning.confinement``), so a plan that passes
names no file outside the checkpoint folder or the cache, and reads no byte that planning would not.
For a cached plan, the entry must also be a plan for the options and config it is cached under, its
budgets (device and host memory, ``planning.offload``) included: offloaded tensors are read through
the same checked reads, so a plan whose reads pass maps no byte of the checkpoint a rank would not read.

Pure; runs on the driver (``orchestrator.api.load``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from planning.errors import PlanError
from planning.plan import LoadPlan

if TYPE_CHECKING:
    from planning.planner import ResolvedModel


def check_plan_matches(plan: LoadPlan, resolved: ResolvedModel, *, options: dict | None = None) -> None:
    """Refuse ``plan`` unless it is a plan of ``resolved`` (a ``planning.planner.ResolvedModel``) as the module
    docstring says; ``options`` (tp, pp, nodes, device, attn_implementation): also those of the plan, and
    the config too (a plan cache entry)."""
    m = plan.model
    where = f"the plan of {m.source!r}"
    made_for = (m.kind, m.root, m.revision, m.checkpoint_format)
    now = (resolved.kind, resolved.root, resolved.revision, resolved.index.format)
    if made_for != now or (m.remote and m.source != str(resolved.ref_source)):
        raise PlanError(
            f"{where} was made for {_location(*made_for[:3], m.source)} ({made_for[3]}), but the checkpoint is "
            f"{_location(*now[:3], resolved.ref_source)} ({now[3]}); plan it again"
        )
    _check_files(plan.files, resolved.index.files, where=where)
    tensors = resolved.index.tensors
    for r in plan.ranks:
        for p in r.params:
            for item in p.reads:
                entry = tensors.get(item.tensor)
                planned = (item.file, item.file_offset, tuple(item.src_shape), item.src_dtype)
                if entry is None or planned != (entry.file, entry.start, tuple(entry.shape), entry.dtype):
                    actual = "absent" if entry is None else f"{entry.file} at byte {entry.start}, {entry.dtype} {list(entry.shape)}"
                    raise PlanError(
                        f"{where}: rank {r.rank}, {p.name} reads tensor {item.tensor!r} from {item.file} at byte "
                        f"{item.file_offset}, {item.src_dtype} {list(item.src_shape)}, but in the checkpoint it is {actual}"
                    )
    if options is None:
        return
    wanted = {"tp": options.get("tp"), "pp": options.get("pp"), "nodes": options.get("nodes"),
              "device": options.get("device"), "attn_implementation": options.get("attn_implementation", "sdpa")}
    got = {"tp": plan.tp, "pp": plan.pp, "nodes": plan.num_nodes, "device": plan.device,
           "attn_implementation": plan.attn_implementation}
    differ = sorted(k for k in wanted if wanted[k] is not None and wanted[k] != got[k])
    if differ:
        raise PlanError(f"{where} is for {', '.join(f'{k}={got[k]!r}' for k in differ)}, not the "
                        f"{', '.join(f'{k}={wanted[k]!r}' for k in differ)} asked for")
    if "max_memory" in options:
        from planning.offload import rank_budgets

        asked = rank_budgets(options["max_memory"], plan.world_size, device=plan.device)
        held = list(zip(plan.budgets, plan.cpu_budgets or [None] * plan.world_size))
        if [(b.device, b.cpu) for b in asked] != held:
            raise PlanError(f"{where} has (device, cpu) budgets {held}, not the {[(b.device, b.cpu) for b in asked]} "
                            f"of max_memory={options['max_memory']!r}")
    if m.config != resolved.config_dict:
        raise PlanError(f"{where} holds another config.json than the checkpoint's")


def _location(kind: str, root: str | None, revision: str | None, source) -> str:
    return f"folder {root}" if root is not None else f"{kind} checkpoint {source}@{revision}"


def _check_files(planned, actual, *, where: str) -> None:
    if tuple(planned) == tuple(actual):
        return
    have = {f.name: f for f in actual}
    for f in planned:
        other = have.get(f.name)
        if other is None:
            raise PlanError(f"{where} names file {f.name!r}, which is not a file of the checkpoint ({sorted(have)[:10]})")
        if f != other:
            fields = [k for k in ("size", "header_size", "header_sha256", "sha256", "git_sha1") if getattr(f, k) != getattr(other, k)]
            raise PlanError(
                f"{where}: {f.name} differs from the checkpoint's in {', '.join(fields)} "
                f"({', '.join(f'{getattr(f, k)!r} vs {getattr(other, k)!r}' for k in fields)}); plan it again"
            )
    missing = sorted(set(have) - {f.name for f in planned})
    if missing or len(planned) != len(actual):
        raise PlanError(f"{where} lacks file(s) {missing} of the checkpoint; plan it again")
