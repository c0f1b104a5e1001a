"""The public API: ``orchestrator.plan`` (pure) and ``orchestrator.load`` (Ray).

``load`` runs the stages in order, each with a deadline: resolve (topology, options, the checkpoint's
files, headers and config: bad input of that kind fails before anything starts); connect to Ray;
reserve one placement bundle per node and start one actor per rank while the plan is finished on a
background thread (building the meta skeleton imports transformers' model code, which the ranks
import too: the two overlap); hand the plan to the ranks; fetch (Hub checkpoints: each node downloads
only what its ranks read); materialize (each rank reads its byte ranges); hand tied tensors across
stages; finalize (each rank builds its local model). No weight byte is read before the plan is
complete. A rank (or node fetcher) whose process dies in any of these steps is restarted and the load
goes on (``RankGroup.settle``, bounded by ``max_restarts``). On any other failure — or Ctrl-C —
everything started so far is removed before the exception propagates; a planning error is reported
as itself, whatever step it interrupted.

Runs on the driver.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import fields, replace
from typing import TYPE_CHECKING

from orchestrator.cluster import connect
from orchestrator.load_options import DEFAULT_TIMEOUT_S, LoadOptions
from orchestrator.loaded_model import LoadedModel
from orchestrator.materialize import materialize
from orchestrator.plan_cache import PlanCache, plan_key
from orchestrator.rank_group import RankGroup
from planning.build import node_blocks
from planning.plan import LoadPlan
from planning.plan_check import check_plan_matches
from planning.options import PlanOptions, SourceOptions, changed, option_groups
from planning.planner import make_plan
from planning.validate import validate_plan
from workers.sources import resolve_model, resolve_plan_checkpoint, source_of

if TYPE_CHECKING:  # the driver imports torch only once it handles tensors (LoadedModel)
    import torch
    from transformers.utils.quantization_config import QuantizationConfigMixin

log = logging.getLogger("meshload")

_PLAN_FIELDS = frozenset(f.name for f in fields(PlanOptions))


def plan(
    model: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    nodes: int = 1,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    tp_plan: dict[str, str] | None = None,
    device_map: dict[str, int | str] | None = None,
    max_memory=None,
    attn_implementation: str | None = None,
    model_class: str | None = None,
    renamings: dict[str, str] | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    quantization: QuantizationConfigMixin | dict | None = None,
) -> LoadPlan:
    """Plan a load without a cluster and without reading a weight byte (headers only).

    ``model``: a local folder, a single ``.safetensors`` file, or a Hub repo id (``revision=``).
    ``nodes`` is a number: ranks are spread over that many nodes in contiguous blocks.
    ``quantization``: for a pre-quantized checkpoint, a transformers config of its method whose loading
    attributes win, as with ``from_pretrained`` (``FineGrainedFP8Config(dequantize=True)``); docs/QUANTIZED.md.
    The keywords are the fields of ``planning.options.PlanOptions`` and ``SourceOptions`` (their help texts,
    defaults and checks: a bad value is an ``OptionError`` naming it).
    """
    given = dict(locals())
    del given["model"]
    plan_options, source_options = option_groups(given, PlanOptions, SourceOptions)
    return make_plan(resolve_model(model, source_options), plan_options)


def load(
    model: str | os.PathLike | LoadPlan,
    *,
    tp: int = 1,
    pp: int = 1,
    nodes: int = 1,
    device: str = "cpu",
    address: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    placement_timeout_s: float = 60.0,
    progress: bool = True,
    cpus_per_rank: float = 1,
    gpus_per_rank: float | None = None,
    num_threads: int | None = None,
    max_restarts: int = 2,
    zero_copy: bool = True,
    fetch: str | None = None,
    fetch_gap_bytes: int | None = None,
    worker_cls: type | None = None,
    fetcher_cls: type | None = None,
    plan_cache: bool | str | os.PathLike = True,
    **plan_options,
) -> LoadedModel:
    """Load ``model`` onto ``tp × pp`` ranks over ``nodes`` Ray nodes; returns a ``LoadedModel``.

    ``model`` is what ``plan`` takes, or a ``LoadPlan`` made earlier (then topology and plan options
    come from it). ``plan_options`` are those of ``plan`` (dtype, tp_plan, device_map, max_memory, attn_implementation,
    model_class, renamings, revision, cache_dir, token, allow_pickle, quantization). ``address`` selects a Ray
    cluster (default: the one ``ray.init()`` finds, else an embedded local one with ``nodes``
    simulated nodes). Hub checkpoints: ``fetch`` is ``"ranges"`` (default: each node downloads only
    the byte ranges its ranks read, joining ranges closer than ``fetch_gap_bytes``, 1 MiB by default)
    or ``"files"`` (whole files). On CPU, ``zero_copy`` (default) makes shards that are one contiguous
    range of a file private mappings of the page cache instead of copies. A rank whose process dies
    (killed, or its node lost) in any phase of the load — or a node's fetcher — is restarted up to
    ``max_restarts`` times, on another node if its node is gone and the cluster has room; during
    inference, each ``logits``/``generate`` call restores up to ``max_restarts`` lost ranks' deaths.
    ``worker_cls``/``fetcher_cls`` replace ``RankWorker``/``NodeFetcher`` with a subclass (the tests
    inject faults with them).
    ``gpus_per_rank`` (``device="cuda"``): the share of a GPU each rank reserves, 1 by default; below 1
    ranks share GPUs (pipeline stages at tp=1 do; TP ranks need a GPU each for NCCL).
    ``plan_cache``: plans are kept on the driver's disk and reused when the checkpoint's config and
    headers, the options and meshload's planning code are the same (``True``: the default folder,
    ``$MESHLOAD_PLAN_CACHE`` or ``~/.cache/meshload/plans``; a path: that folder; ``False``: off); see
    ``orchestrator/plan_cache.py``. Use as a context manager, or call ``shutdown()``.
    The keywords are the fields of ``orchestrator.load_options.LoadOptions`` and ``planning.options.PlanOptions``
    and ``SourceOptions`` (help texts, defaults, checks: a bad value is an ``OptionError`` naming it).
    """
    given = dict(locals())
    del given["model"], given["plan_options"]
    given.update(plan_options)
    phases = PhaseClock()
    if isinstance(model, LoadPlan):  # topology and plan options come from the plan
        device, nodes = model.device, model.num_nodes
        wanted = None
        source_options, options = option_groups({k: v for k, v in given.items() if k not in _PLAN_FIELDS},
                                                 SourceOptions, LoadOptions)
    else:
        wanted, source_options, options = option_groups(given, PlanOptions, SourceOptions, LoadOptions)
    gpus_per_rank = options.gpus_for(device)
    if wanted is None:
        _check_given_plan(model, source_options)
        planning = _Planning.done(model)
        node_of_rank = [r.node for r in model.ranks]
    else:
        planning = _Planning.start(model, wanted, source_options, plan_cache=options.plan_cache)
        node_of_rank = node_blocks(wanted.world_size, nodes)  # the plan places its ranks with node_blocks too
    phases.mark("resolve")
    ranks_per_node = max(node_of_rank.count(n) for n in range(nodes))
    connection = group = driver_torch = None
    try:
        connection = connect(
            options.address,
            num_nodes=nodes,
            cpus_per_node=max(1, int(ranks_per_node * options.cpus_per_rank)),
            gpus_per_node=math.ceil(ranks_per_node * gpus_per_rank),
        )
        phases.mark("connect")
        group = RankGroup(node_of_rank, timeout_s=options.timeout_s, max_restarts=options.max_restarts)
        group.start(  # the ranks import torch and transformers while the plan is finished
            cpus_per_rank=options.cpus_per_rank,
            gpus_per_rank=gpus_per_rank,
            num_threads=options.num_threads,
            placement_timeout_s=options.placement_timeout_s,
            env=_rank_env(connection),
            worker_cls=options.worker_cls,
            worker_options={"zero_copy": options.zero_copy, "device": device},
            poll=planning.raise_if_failed,
            plan=planning.ready(),  # a plan known already goes with the ranks' constructor
        )
        phases.mark("start ranks")
        if group.preloaded.get(0):  # rank 0 can plan sooner than the driver, which imports transformers first
            planning.delegate(lambda resolved, options: group.submit("plan_here", resolved, options, ranks=[0])[0])
        driver_torch = _import_torch_meanwhile(device)
        if not group.attached:
            load_plan = planning.result()
            phases.mark("plan")
            group.attach(load_plan)  # e.g. flash-attn checked on every node, before a single weight byte is fetched
            phases.mark("attach plan")
        load_plan = planning.result()
        files = _rank_files(load_plan, group, source_options, options)
        files.fetch()
        group.revive(group.dead_ranks(group.ranks), phase="fetch")  # ranks that died while their node fetched
        phases.mark("fetch")
        reports = materialize(load_plan, group, files, progress=options.progress)
        phases.mark("materialize")
        if driver_torch is not None:
            driver_torch.join()
        return LoadedModel(load_plan, [reports[r] for r in group.ranks], group, connection, files=files,
                           timeout_s=options.timeout_s, timings=phases.seconds, plan_cached=planning.cached,
                           planned_on=planning.planned_on,
                           rank_files=lambda new_plan: _rank_files(new_plan, group, source_options,
                                                                   replace(options, progress=False)),
                           source_options=replace(source_options, revision=None))  # update_weights names its own
    except BaseException as exc:
        try:
            if group is not None:
                group.shutdown()
        finally:
            if connection is not None:
                connection.close()
            if driver_torch is not None:  # not left importing while the interpreter exits
                driver_torch.join()
        # A bad input found by planning is the error to report, not what it interrupted (an
        # unreachable cluster, a placement that cannot be met): let planning finish and prefer its error.
        failed = None if isinstance(exc, KeyboardInterrupt) else planning.wait_error()
        if failed is not None and failed is not exc:
            raise failed from None
        raise


def _check_given_plan(plan: LoadPlan, source_options: SourceOptions) -> None:
    """A plan passed in (made earlier, maybe read from a file) is checked against its checkpoint as it is
    now — its names, then its files and reads — before anything starts (``planning.plan_check``)."""
    validate_plan(plan)
    resolved = resolve_plan_checkpoint(plan, source_options)
    check_plan_matches(plan, resolved)


class _Planning:
    """``make_plan`` running on a background thread while the driver connects and starts the ranks.

    What is cheap to check — topology, options, the checkpoint's files, headers and config — is checked
    before it returns, so bad input of that kind fails before anything starts; the rest (building the
    skeleton, which imports transformers' model code) overlaps the ranks' own start."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._plan: LoadPlan | None = None
        self._error: BaseException | None = None
        self.cached = False  # the plan came from the plan cache
        self.planned_on = "driver"  # or "rank 0" (``delegate``)
        self._request: tuple | None = None  # (resolved, PlanOptions, cache, key) while planning runs

    @classmethod
    def done(cls, plan: LoadPlan, *, cached: bool = False) -> "_Planning":
        p = cls()
        p._plan = plan
        p.cached = cached
        p._done.set()
        return p

    @classmethod
    def start(cls, model, options: PlanOptions, source_options: SourceOptions, *, plan_cache) -> "_Planning":
        resolved = resolve_model(model, source_options)
        cache = key = None
        if plan_cache is not False:
            cache = PlanCache(None if plan_cache is True else plan_cache)
            # the key: the topology, and every other option given a value of its own (token and cache_dir
            # say where, not what: the same plan)
            key_options = {"tp": options.tp, "pp": options.pp, "nodes": options.nodes, "device": options.device,
                           **changed(options), **changed(replace(source_options, token=None, cache_dir=None))}
            key = plan_key(resolved, key_options)
            cached = cache.get(key, check=lambda entry: check_plan_matches(entry, resolved, options=key_options))
            if cached is not None:
                log.info("meshload: plan reused from %s", cache.path(key))
                return cls.done(cached, cached=True)
        p = cls()
        p._request = (resolved, options, cache, key)

        def run() -> None:
            try:
                p._finish(make_plan(resolved, options), on="driver")
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                with p._lock:
                    if not p._done.is_set():
                        p._error = exc
                        p._done.set()

        threading.Thread(target=run, name="meshload-plan", daemon=True).start()
        return p

    def _finish(self, plan: LoadPlan, *, on: str) -> None:
        """The first plan made wins (the driver's or rank 0's: the same plan); it is in the plan cache by the
        time ``result`` returns it."""
        with self._lock:
            if self._done.is_set():
                return
            _, _, cache, key = self._request
            if cache is not None:
                cache.put(key, plan)
            self._plan, self.planned_on = plan, on
            self._done.set()

    def delegate(self, submit: Callable[..., object]) -> None:
        """Also plan on a rank, through ``submit(resolved, options) -> object ref`` (``RankWorker.plan_here``),
        while the driver goes on planning: a rank in a preloaded Ray worker (``workers.preload``) has
        transformers' model code imported, which the driver imports first (4-6 s on an H200 host). The
        first plan made is used. A rank's failure is only logged: the driver's planning reports errors."""
        if self._done.is_set() or self._request is None:
            return
        import ray

        resolved, options, _, _ = self._request
        ref = submit(resolved, options)

        def wait() -> None:
            try:
                self._finish(ray.get(ref), on="rank 0")
            except BaseException as exc:  # noqa: BLE001 - the driver's planning goes on and decides
                log.warning("meshload: planning on rank 0 failed (the driver's planning goes on): %s", exc)

        threading.Thread(target=wait, name="meshload-plan-on-rank", daemon=True).start()

    def wait_error(self, timeout_s: float = 300.0) -> BaseException | None:
        """Planning's error once it has finished (None if it succeeded or is still running after ``timeout_s``)."""
        self._done.wait(timeout_s)
        return self._error if self._done.is_set() else None

    def ready(self) -> LoadPlan | None:
        """The plan if planning has already finished successfully (a given or cached plan), else None."""
        return self._plan if self._done.is_set() and self._error is None else None

    def raise_if_failed(self) -> None:
        if self._done.is_set() and self._error is not None:
            raise self._error

    def result(self) -> LoadPlan:
        self._done.wait()
        self.raise_if_failed()
        return self._plan


class PhaseClock:
    """Wall seconds of each step of a load, on the driver (``LoadedModel.timings``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now


def _import_torch_meanwhile(device: str) -> threading.Thread | None:
    """On a GPU load, import torch on a thread of the driver while it waits for the ranks: the first
    ``logits()``/``generate()`` needs it (tensors in and out), and a driver given a cached plan has not
    imported it yet (2-3 s on an H200 host, which the first logits paid after ready). A CPU load leaves
    it: there the ranks' reads need the same few cores."""
    if device != "cuda" or "torch" in sys.modules:
        return None
    thread = threading.Thread(target=importlib.import_module, args=("torch",), name="meshload-driver-torch", daemon=True)
    thread.start()
    return thread


def _rank_env(connection) -> dict[str, str]:
    # gloo picks its interface from the host name, which on a one-machine cluster may not be loopback
    return {"GLOO_SOCKET_IFNAME": "lo"} if connection.embedded is not None else {}


def _rank_files(load_plan: LoadPlan, group: RankGroup, source_options: SourceOptions, options: LoadOptions):
    """Where each rank reads: the files in place, or what each node fetched, as the plan's source says."""
    from orchestrator.fetch_stage import FilesInPlace, NodeFetch

    source = source_of(load_plan)
    if source.fetcher_class() is None:
        return FilesInPlace(source.paths_in_place(load_plan))
    return NodeFetch(
        load_plan,
        group,
        source=source,
        cache_dir=source_options.cache_dir,
        token=source_options.token,
        options=options.fetch_options(),
        progress=options.progress,
        fetcher_cls=options.fetcher_cls,
    )
