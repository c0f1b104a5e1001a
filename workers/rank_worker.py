"""One rank of a load: a plain class that runs inside a rank's Ray actor (``workers.rank_host``).

Lifecycle, each step a method the driver calls (with a timeout):

1. ``RankWorker(plan, rank, device=...)`` — cheap; sets thread count and, in the background, readies
   the device (CUDA context, page-locked staging buffers). With ``plan=None`` the rank starts while
   the driver is still planning, importing transformers' model code meanwhile; ``attach(plan)`` then
   hands it the plan. With a plan, that import waits until the reads are done, so it never slows them.
2. ``load(paths)`` — reads the rank's planned byte ranges into freshly allocated local tensors
   (``workers.reader``); ``progress()`` can be polled meanwhile from another thread. Tensors the plan
   offloads go to host memory or stay on disk (``workers.offload_store``).
3. ``tied_for(rank)`` / ``receive_tied(...)`` — a tied tensor read by one pipeline stage is handed to
   the stage that shares it, instead of being read twice.
4. ``finalize()`` — builds the rank's transformers model around its tensors (``workers.local_model``),
   recomputes non-persistent buffers, and returns the ``RankReport``.
5. For inference: ``pick_port()`` (rank 0: serves the rendezvous store on its node address),
   ``init_inference(...)`` (every rank: process group, TP collectives, stage runner, and the streaming of
   offloaded layers, ``workers.offload_stream``), then
   ``forward_step(...)`` per step; the KV cache stays on the rank. After a peer is lost: ``close()``
   (leave the group), then ``init_inference(...)`` again.
6. Once inference is set up: ``decode(...)`` runs a whole generation on the rank (a model of one
   stage; ``stop_decoding()`` ends it early); ``run(fn, args, kwargs)`` calls a user's ``fn(ctx, ...)``
   with the rank's ``RankContext`` (``workers.rank_context``).
7. Once finalized: ``reload(plan, paths)`` reads another checkpoint of the same model into the rank's
   existing tensors (``LoadedModel.update_weights``).

Everything here is testable without Ray: tests drive ``RankWorker`` directly, for every rank, in
one process.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from planning.errors import CheckpointError
from planning.offload import tier_bytes
from planning.plan import LoadPlan, ParamPlan, ReadItem
from planning.plan_json import plan_from_json
from planning.skeleton import parse_dtype
from workers.decoding import Decoder, Decoding
from workers.distributed import init_world, leave_world, listen_store
from workers.file_guard import FileGuard
from workers.fingerprint import fingerprint
from workers.local_model import build_local_model, get_tensor, install, rebuild_meta_model
from workers.offload_store import OffloadStore
from workers.offload_stream import LayerStreamer
from workers.preload import gil_switch_interval, preloaded
from workers.node_files import NodeFiles
from workers.rank_context import RankContext
from workers.reader import URING_DEPTH, CheckpointFiles, Progress, io_defaults, read_items, zero_copy_view
from workers.report import RankReport, io_counters, node_location, peak_rss_bytes, process_age_s
from workers.stage_runner import StageRunner
from workers.staging import StagingRing
from workers.tp_runtime import GroupSlot, apply_tensor_parallel
from workers.wire import from_wire, to_wire

if TYPE_CHECKING:
    from planning.options import PlanOptions
    from planning.planner import ResolvedModel


def allocate_params(params: list[ParamPlan], device: torch.device) -> dict[str, torch.Tensor]:
    """Storage for the rank's tensors. On a GPU: one allocation per dtype, each tensor a view into it
    (one ``cudaMalloc`` per dtype instead of one per tensor, no fragmentation). On the CPU: one tensor
    each (allocation is lazy there, and a view would drag its whole buffer along when pickled).
    Rows a rank holds only as padding (vocab not divisible by tp) are zeroed, never left as garbage."""
    out: dict[str, torch.Tensor] = {}
    if device.type != "cuda":
        for p in params:
            empty = torch.zeros if p.shard is not None and p.shard.padding else torch.empty
            out[p.name] = empty(p.shape, dtype=parse_dtype(p.dtype), device=device)
        return out
    by_dtype: dict[torch.dtype, list[ParamPlan]] = {}
    for p in params:
        by_dtype.setdefault(parse_dtype(p.dtype), []).append(p)
    for dtype, group in by_dtype.items():
        sizes = [math.prod(p.shape) for p in group]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        at = 0
        for p, n in zip(group, sizes):
            out[p.name] = tensor = flat[at : at + n].view(p.shape)
            if p.shard is not None and p.shard.padding:
                tensor.zero_()
            at += n
    return out


class RankWorker:
    """See module docstring. ``plan`` may be a ``LoadPlan``, its JSON, or ``None``: then the rank starts
    before planning has finished (its imports overlap the driver's planning) and ``attach(plan)``
    gives it the plan later. ``pin_offload``: page-lock tensors offloaded to host memory (default: when the
    rank has a GPU)."""

    def __init__(
        self,
        plan: LoadPlan | str | None,
        rank: int,
        *,
        num_threads: int | None = None,
        io_threads: int | None = None,
        staging_bytes: int | None = None,
        zero_copy: bool = True,
        device: str | None = None,
        pin_offload: bool | None = None,
    ) -> None:
        self.rank = rank
        if num_threads:
            torch.set_num_threads(num_threads)
        self.zero_copy = zero_copy
        self._io_options = (io_threads, staging_bytes)
        self._mapped: set[str] = set()  # tensors that are views of a mapped file (CPU, zero-copy)
        self.plan: LoadPlan | None = None
        self.progress = Progress(total=0)
        self.tensors: dict[str, torch.Tensor] = {}
        self.model: torch.nn.Module | None = None
        self._t0: float | None = None
        self._bytes_read = 0
        self._bytes_fetched = 0
        self._disk_read = 0
        self._read_s = 0.0
        self.runner: StageRunner | None = None
        self.cache = None
        self._stop_decoding = threading.Event()  # decode() ends after its current step (an abandoned stream)
        self._store = None  # rank 0: the rendezvous store it serves (pick_port)
        self._guard = FileGuard()  # read leases on the files this rank maps (workers.file_guard)
        self._pin_offload = pin_offload  # None: page-lock "cpu"-offloaded tensors when the rank has a GPU
        self.offload: OffloadStore | None = None
        self.streamer: LayerStreamer | None = None
        self.weights_ready_at = 0.0  # wall clock (epoch s) when the last read landed in the rank's storage
        # The device is readied at once, while the driver may still be planning: CUDA context, and the
        # page-locked staging buffers every read to the GPU goes through.
        self._staging = None
        self._device_ready = threading.Thread(target=self._ready_device, args=(device,), name="meshload-device", daemon=True)
        self._device_ready.start()
        # Importing transformers' model code takes seconds in a fresh process (on an H200 host 6-7 s: it
        # imports torch.distributed.tensor, dynamo, sympy). Without a plan yet, the import overlaps the
        # driver's planning. With one (a cached plan), it waits until the reads are done: run beside them it
        # holds the GIL that the read loop needs between chunks — measured on an H200, an 8B's reads went
        # from 0.7 s to 6.5 s and the load got slower overall (docs/BENCHMARKS.md). In a worker that Ray
        # preloaded with it (workers.preload), the skeleton is built at once, beside the reads: its import is done,
        # and the build (0.6 s) costs the reads less than waiting for them would (docs/BENCHMARKS.md).
        self._skeleton: dict = {}
        self._attached = threading.Event()
        self._imported = threading.Event()  # transformers' model code imported (or its import failed)
        self._skeleton_thread = threading.Thread(target=self._prebuild, name="meshload-skeleton", daemon=True)
        if plan is not None:
            self._set_plan(plan)
        if plan is None or preloaded():
            self._skeleton_thread.start()

    def attach(self, plan: LoadPlan | str) -> None:
        """Give the rank its plan (once), then check that this node can run it (``check_kernels``)."""
        self._set_plan(plan)
        self.check_kernels()

    def _set_plan(self, plan: LoadPlan | str) -> None:
        """Device and I/O settings from the plan; the skeleton is then built in the background."""
        if self.plan is not None:
            raise RuntimeError(f"rank {self.rank}: a plan is already attached")
        plan = plan_from_json(plan) if isinstance(plan, str) else plan
        self.rank_plan = plan.ranks[self.rank]
        self.device = torch.device("cuda", torch.cuda.current_device()) if plan.device == "cuda" else torch.device("cpu")
        default_threads, default_staging = io_defaults(self.device)
        io_threads, staging_bytes = self._io_options
        self.io_threads = io_threads or default_threads
        self.staging_bytes = staging_bytes or default_staging
        self.progress = Progress(total=self.rank_plan.read_bytes)
        pin = self.device.type == "cuda" if self._pin_offload is None else self._pin_offload
        self.offload = OffloadStore(pin=pin, guard=self._guard)
        self.plan = plan
        self._attached.set()

    def _ready_device(self, device: str | None) -> None:
        """CUDA context and staging buffers, for a rank told it runs on a GPU (errors surface in ``load``)."""
        if device != "cuda":
            return
        try:
            torch.cuda.init()
            torch.empty(1, device="cuda")  # the context
            _, staging_bytes = io_defaults(torch.device("cuda"))
            self._staging = StagingRing(URING_DEPTH, self._io_options[1] or staging_bytes, pin=True).fill()
        except BaseException as exc:  # noqa: BLE001 - reported by load(), on the caller's thread
            self._staging = exc

    def _start_prebuild(self) -> None:
        if not self._skeleton_thread.is_alive() and self._skeleton_thread.ident is None:
            self._skeleton_thread.start()

    def _prebuild(self) -> None:
        try:
            t0 = time.perf_counter()
            try:
                import transformers.modeling_utils  # noqa: F401 - the bulk of the import time, needed by any model
            finally:
                self._imported.set()
            self._skeleton["import_s"] = time.perf_counter() - t0
            self._attached.wait()  # attach() comes with the constructor or from a later call
            t0 = time.perf_counter()
            # The build may run beside the reads (a preloaded rank): the reader's threads need the GIL
            # between chunks, so this thread hands it over every 0.5 ms rather than Python's 5 ms.
            with gil_switch_interval(0.0005):
                self._skeleton["model"] = rebuild_meta_model(self.plan)
            self._skeleton["meta_s"] = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - re-raised by finalize, on the caller's thread
            self._skeleton["error"] = exc

    # -- introspection -------------------------------------------------------------------------
    def where(self) -> dict:
        """Where this rank runs: Ray node id (if under Ray), IP, host, pid; and whether its process has
        transformers' model code imported already (``workers.preload``)."""
        return {"rank": self.rank, **node_location(), "preloaded": preloaded()}

    def plan_here(self, resolved: ResolvedModel, options: PlanOptions) -> LoadPlan:
        """``planning.planner.make_plan`` run in this rank's process, for a driver that has not imported
        transformers' model code yet: in a preloaded worker building the skeleton takes well under a
        second, where the driver's own import takes seconds. Pure: the same plan the driver would make."""
        from planning.planner import make_plan

        self._start_prebuild()
        self._imported.wait()  # the skeleton thread's import of transformers: never two imports at once
        return make_plan(resolved, options)

    def get_progress(self) -> tuple[int, int]:
        return self.progress.done, self.progress.total

    # -- loading ---------------------------------------------------------------------------------
    def load(self, paths: dict[str, str], bytes_fetched: int = 0) -> int:
        """Read every planned range of this rank from ``paths`` (plan file name → local path); returns bytes read."""
        if self.plan is None:
            raise RuntimeError(f"rank {self.rank}: no plan attached; call attach(plan) first")
        self._t0 = time.perf_counter()
        self._bytes_fetched = bytes_fetched
        staging = self._staging_ring()
        disk_before = io_counters().get("read_bytes", 0)
        readable = [p for p in self.rank_plan.params if p.reads]

        def place(files: CheckpointFiles) -> list[tuple[ReadItem, torch.Tensor]]:
            for p in readable:
                # Disk-offloaded tensors are views of the checkpoint wherever they can be; on CPU, with zero_copy,
                # so are the device's (a "cpu"-offloaded tensor is a copy in host memory by definition).
                if p.offload == "disk" or (p.offload is None and self.device.type == "cpu" and self.zero_copy):
                    view = zero_copy_view(files, p)
                    if view is not None:
                        self.tensors[p.name] = view
                        self._mapped.add(p.name)
                        self.progress.add(p.nbytes)
                        if p.offload == "disk":
                            self.offload.viewing(p.name, p.reads[0].file)
            to_read = [p for p in readable if p.name not in self._mapped]
            self.tensors.update(allocate_params([p for p in to_read if p.offload is None], self.device))
            for p in to_read:
                if p.offload == "cpu":
                    self.tensors[p.name] = self.offload.host(p)
                elif p.offload == "disk":  # a cast, a strided slice or padding: a file of the rank's own
                    self.tensors[p.name] = self.offload.own_file(p.name, p.shape, parse_dtype(p.dtype))
                    self._mapped.add(p.name)
            return [(item, self.tensors[p.name]) for p in to_read for item in p.reads]

        self._bytes_read = self._read(paths, place, staging=staging)
        for p in readable:  # written, or mapped in by a neighbour's read (fault-around): out of resident memory
            if p.offload == "disk":
                self.offload.release(p.name, self.tensors[p.name])
        self.weights_ready_at = time.time()
        self._disk_read = io_counters().get("read_bytes", 0) - disk_before
        self._read_s = time.perf_counter() - self._t0
        self._start_prebuild()
        for p in self.rank_plan.params:
            if p.alias_of is not None and p.alias_of in self.tensors:  # an initialised owner is aliased by finalize
                self.tensors[p.name] = self.tensors[p.alias_of]
                if p.alias_of in self._mapped:
                    self._mapped.add(p.name)
        return self._bytes_read

    def _staging_ring(self) -> StagingRing | None:
        """The page-locked ring readied with the device, if it suits this rank's reads (GPU, its chunk size)."""
        self._device_ready.join()
        staging = self._staging
        if isinstance(staging, BaseException):
            raise staging
        if staging is not None and (self.device.type != "cuda" or staging.nbytes != self.staging_bytes):
            return None
        return staging

    def _read(self, paths: dict[str, str], jobs_for, *, staging=None) -> int:
        """Open the plan's files (each checked by ``NodeFiles``, leased by the guard), read the jobs that
        ``jobs_for(files)`` returns, and refuse a file changed meanwhile; returns the bytes read."""
        with CheckpointFiles(paths, open_file=NodeFiles(self.plan).open, guard=self._guard) as files:
            jobs = jobs_for(files)
            on_device = [job for job in jobs if job[1].device.type == self.device.type]
            read_items(files, on_device, progress=self.progress, threads=self.io_threads,
                       staging_bytes=self.staging_bytes, staging=staging)
            # Offloaded tensors in host memory (a GPU rank's "cpu"/"disk" tiers) are read on their own, never
            # through the GPU's staging ring.
            in_host = [job for job in jobs if job[1].device.type != self.device.type]
            if in_host:
                read_items(files, in_host, progress=self.progress, threads=self.io_threads)
            bytes_read = files.bytes_read
        changed = self._guard.changes()
        if changed:
            raise CheckpointError(
                f"rank {self.rank}: {sorted(changed)} truncated or opened for writing while this rank read them; "
                f"what was read may mix two versions of the file"
            )
        return bytes_read

    def reload(self, plan: LoadPlan | str, paths: dict[str, str], bytes_fetched: int = 0) -> int:
        """New values for the loaded tensors, read into their existing storage (``LoadedModel.update_weights``).

        ``plan`` is the loaded plan re-made against another checkpoint (``planning.retarget``): the same
        parameters, other reads. Every planned range is read straight into the tensor that holds it now —
        no allocation, the module's parameters keep their storage (on CPU a tensor that was a map of the
        old file keeps its address: its pages become private copies as they are written). Tensors
        received from another stage come with ``receive_tied`` afterwards; initialised ones keep their
        value. The KV cache is dropped. Returns the bytes read."""
        plan = plan_from_json(plan) if isinstance(plan, str) else plan
        if self.model is None:
            raise RuntimeError(f"rank {self.rank}: finalize() must run before reload()")
        rank_plan = plan.ranks[self.rank]
        layout = [(p.name, p.shape, p.dtype, p.shard, p.alias_of, p.receive_from, p.computed) for p in rank_plan.params]
        if layout != [(p.name, p.shape, p.dtype, p.shard, p.alias_of, p.receive_from, p.computed) for p in self.rank_plan.params]:
            raise ValueError(f"rank {self.rank}: reload() needs a plan with this rank's parameters, cut the same way")
        self.plan, self.rank_plan = plan, rank_plan
        self.progress = Progress(total=rank_plan.read_bytes)
        self.cache = None
        t0 = time.perf_counter()
        self._bytes_read = self._read(paths, lambda files: [(item, self.tensors[p.name]) for p in rank_plan.params for item in p.reads],
                                      staging=self._staging_ring())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._bytes_fetched = bytes_fetched
        self._read_s = time.perf_counter() - t0
        self.weights_ready_at = time.time()
        return self._bytes_read

    def tied_for(self, to_rank: int) -> dict[str, torch.Tensor]:
        """Tensors this rank hands to rank ``to_rank`` of another stage, by their name there (on CPU)."""
        return {s.as_name: self._export(s.name) for s in self.rank_plan.sends if s.to_rank == to_rank}

    def _export(self, name: str) -> torch.Tensor:
        """A CPU tensor safe to ship: a mapped view is copied, or pickling would ship its whole file."""
        t = self.tensors[name].detach()
        return to_wire(t.clone() if name in self._mapped else t.cpu())

    def receive_tied(self, *parts: dict[str, torch.Tensor]) -> None:
        """Store tied tensors sent by other stages (each part is one sender's ``tied_for`` result)."""
        expected = {p.name: p for p in self.rank_plan.params if p.receive_from is not None}
        for name, tensor in ((n, t) for part in parts for n, t in part.items()):
            p = expected.get(name)
            if p is None or tuple(tensor.shape) != p.shape:
                raise ValueError(f"rank {self.rank}: unexpected tied tensor {name!r} of shape {tuple(tensor.shape)}")
            if self.model is not None:  # new weights (reload): into the storage the module computes with
                self.tensors[name].copy_(tensor)
                continue
            # Object-store tensors may be read-only shared memory: copy into our own storage.
            self.tensors[name] = from_wire(tensor, p.dtype).to(self.device, dtype=parse_dtype(p.dtype), copy=True)

    def finalize(self) -> RankReport:
        """Build the local model and report. Every tensor of the rank must be present by now."""
        missing = [p.name for p in self.rank_plan.params if not p.computed and p.alias_of is None and p.name not in self.tensors]
        if missing:
            raise RuntimeError(f"rank {self.rank}: tensors never filled: {missing}")
        t_build = time.perf_counter()
        self._start_prebuild()
        self._skeleton_thread.join()
        if "error" in self._skeleton:
            raise self._skeleton["error"]
        self.model = build_local_model(
            self.plan, self.rank_plan, self.tensors, self.device, meta_model=self._skeleton.pop("model")
        )
        self._settle_offloaded()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        where = self.where()
        return RankReport(
            rank=self.rank,
            node_id=where["node_id"],
            seconds=time.perf_counter() - (self._t0 if self._t0 is not None else time.perf_counter()),
            bytes_read=self._bytes_read,
            param_bytes=self.rank_plan.param_bytes,
            bytes_fetched=self._bytes_fetched,
            peak_rss_bytes=peak_rss_bytes(),
            node=self.rank_plan.node,
            stage=self.rank_plan.stage,
            tp_rank=self.rank_plan.tp_rank,
            node_ip=where["node_ip"],
            peak_device_bytes=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0,
            disk_read_bytes=self._disk_read,
            read_seconds=self._read_s,
            build_seconds=time.perf_counter() - t_build,
            import_seconds=self._skeleton.get("import_s", 0.0),
            skeleton_seconds=self._skeleton.get("meta_s", 0.0),
            process_seconds=process_age_s(),
            weights_ready_at=self.weights_ready_at,
        )

    def _settle_offloaded(self) -> None:
        """Offloaded tensors made on the rank (initialised ones, absent from the checkpoint) moved to their tier."""
        for p in self.rank_plan.params:
            if p.offload is None or not p.owns_storage or not p.computed:
                continue
            moved = self.offload.settle(p, self.tensors[p.name])
            install(self.model, p.name, moved, is_buffer=p.is_buffer)
            self.tensors[p.name] = get_tensor(self.model, p.name, is_buffer=p.is_buffer)
            if p.offload == "disk":
                self._mapped.add(p.name)
        for p in self.rank_plan.params:
            if p.alias_of is not None and p.offload is not None:
                self.tensors[p.name] = self.tensors[p.alias_of]

    def placement(self) -> dict[str, str]:
        """Where each tensor of the rank lives now: ``"device"``, ``"cpu"`` (host memory; ``"cpu-pinned"`` when
        page-locked), ``"disk:checkpoint"`` (a view of the checkpoint file) or ``"disk:own"`` (a file of the rank's own)."""
        out = {}
        for p in self.rank_plan.params:
            t = self.tensors.get(p.name)
            if t is None:
                continue
            if p.offload == "disk":
                out[p.name] = f"disk:{self.offload.kind(p.name)}"
            elif p.offload == "cpu":
                out[p.name] = "cpu-pinned" if t.is_pinned() else "cpu"
            else:
                out[p.name] = "device"
        return out

    def offload_stats(self) -> dict[str, int]:
        """Bytes this rank offloads to host memory and to disk (of which in files of its own), and bytes its forward
        has streamed to the device so far."""
        own = self.offload.own_file_bytes if self.offload is not None else 0
        streamed = self.streamer.streamed_bytes if self.streamer is not None else 0
        return {"cpu_bytes": tier_bytes(self.rank_plan, "cpu"), "disk_bytes": tier_bytes(self.rank_plan, "disk"),
                "own_file_bytes": own, "streamed_bytes": streamed}

    def local_state(self) -> dict[str, torch.Tensor]:
        """The rank's loaded tensors (CPU copies), by model name; padding included."""
        return {p.name: self._export(p.name) for p in self.rank_plan.params if p.name in self.tensors}

    def fingerprints(self) -> dict[str, tuple[str, tuple[int, ...], int]]:
        """Per local tensor (padding included): dtype, shape and a digest of its bytes, computed on the
        rank's device (``workers.fingerprint``); nothing is copied off the device."""
        out = {}
        for p in self.rank_plan.params:
            t = self.tensors.get(p.name)
            if t is not None:
                out[p.name] = (str(t.dtype).removeprefix("torch."), tuple(t.shape), fingerprint(t))
        return out

    def check_kernels(self) -> None:
        """Fail before any fetch if this rank's node cannot run the requested attention kernel."""
        if self.plan.attn_implementation != "flash_attention_2":
            return
        import importlib.util

        from planning.errors import PlanError

        where = self.where()
        if importlib.util.find_spec("flash_attn") is None:
            raise PlanError(f"flash-attn is not installed on node {where['node_ip'] or where['host']}")
        if not torch.cuda.is_available():
            raise PlanError(f"flash_attention_2 needs CUDA; none on node {where['node_ip'] or where['host']}")

    # -- inference -------------------------------------------------------------------------------
    def pick_port(self) -> tuple[str, int]:
        """Serve the process group's rendezvous store on this rank's node address only (``listen_store``); its address."""
        ip = self.where()["node_ip"] or "127.0.0.1"
        self._store, port = listen_store(ip, self.plan.world_size)
        return ip, port

    def init_inference(
        self, master_addr: str, master_port: int, *, backend: str, collective_timeout_s: float,
        socket_ifname: str | None = None,
    ) -> list[tuple[str, str]]:
        """Join the process group, install TP collectives and the stage runner; returns what was installed.

        Called again after a peer was lost and restored (the old group left with ``close()``): the rank
        joins the new group and its installed collectives switch to it; the KV cache is dropped."""
        if self.model is None:
            raise RuntimeError(f"rank {self.rank}: finalize() must run before init_inference()")
        group = init_world(
            self.plan, self.rank, master_addr=master_addr, master_port=master_port, backend=backend,
            timeout_s=collective_timeout_s, socket_ifname=socket_ifname, store=self._store,
        )
        self.cache = None
        if self.runner is not None:
            self._tp_group.group = group
            return self._installed
        if self.plan.attn_implementation == "flash_attention_2":
            self.model.set_attn_implementation("flash_attention_2")  # imports flash-attn, here only
        self._tp_group = GroupSlot(group)
        self._installed = apply_tensor_parallel(self.model, self.plan, self.rank_plan, self._tp_group)
        self.runner = StageRunner(self.model, self.plan, self.rank_plan)
        if any(p.offload for p in self.rank_plan.params):
            self.streamer = LayerStreamer(self.model, self.plan, self.rank_plan, device=self.device, store=self.offload,
                                          tensors=self.tensors)
        return self._installed

    def forward_step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor | None = None,
        *,
        use_cache: bool = False,
        reset_cache: bool = True,
        last_only: bool = False,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        every_rank: bool = False,
    ) -> torch.Tensor | None:
        """One forward of this rank's stage. Returns the stage output on TP rank 0 (CPU), None elsewhere;
        ``every_rank``: on every rank, on the rank's device. ``position_ids`` are passed on if the model's
        forward takes them."""
        if self.runner is None:
            raise RuntimeError(f"rank {self.rank}: init_inference() has not run")
        from transformers import DynamicCache

        with torch.inference_mode():
            if reset_cache:
                self.cache = DynamicCache(config=self.model.config) if use_cache else None
            kwargs = {}
            if self.cache is not None:
                kwargs.update({self.runner.cache_keyword: self.cache, "use_cache": True})
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask.to(self.device)
            if position_ids is not None and self.runner.takes_position_ids:
                kwargs["position_ids"] = position_ids.to(self.device)
            out = self.runner.forward(
                input_ids.to(self.device), None if hidden is None else hidden.to(self.device), **kwargs
            )
        if self.rank_plan.tp_rank != 0 and not every_rank:
            return None
        if last_only and self.runner.last:
            out = out[:, -1:]
        return out if every_rank else out.cpu()

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, decoding: Decoding) -> Iterator[torch.Tensor]:
        """A whole generation on this rank (a model of one stage, ``pp == 1``): yields each step's tokens.

        Every TP rank runs the same steps (``forward_step``: its collectives need the others) and gets the
        same full-vocabulary logits, and so the same tokens; TP rank 0's are broadcast anyway, so that the
        ranks agree whatever happens, together with whether ``stop_decoding()`` was called (all stop at
        the same step). No round trip to the driver: it only reads the tokens rank 0 yields."""
        if self.plan.pp != 1 or self.runner is None:
            raise RuntimeError(f"rank {self.rank}: decode() runs a one-stage model after init_inference()")
        self._stop_decoding.clear()
        decoder = Decoder(input_ids, attention_mask, decoding, takes_position_ids=self.runner.takes_position_ids)
        while not decoder.done:
            ids, kwargs = decoder.inputs()
            logits = self.forward_step(ids, use_cache=True, reset_cache=decoder.steps == 0, last_only=True, every_rank=True, **kwargs)
            tokens, stop = self._agree(decoder.choose(logits[:, -1]))
            yield decoder.advance(tokens)
            if stop:
                return

    def decode_quietly(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, decoding: Decoding) -> int:
        """``decode`` on a rank whose tokens nobody reads (TP ranks other than 0); the number of steps."""
        return sum(1 for _ in self.decode(input_ids, attention_mask, decoding))

    def stop_decoding(self) -> None:
        """Ask a running ``decode`` to end after its current step (rank 0 tells the others with its tokens)."""
        self._stop_decoding.set()

    def _agree(self, tokens: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """TP rank 0's tokens and stop request, on every rank of the stage."""
        group = self._tp_group.group
        if group is None:
            return tokens, self._stop_decoding.is_set()
        import torch.distributed as dist

        message = torch.cat([tokens, torch.tensor([int(self._stop_decoding.is_set())])])
        if dist.get_backend(group) == "nccl":
            message = message.to(self.device)
        dist.broadcast(message, group_src=0, group=group)
        message = message.cpu()
        return message[:-1], bool(message[-1])

    def context(self) -> RankContext:
        """This rank as a user's function sees it (``workers.rank_context``); after ``init_inference``."""
        if self.runner is None:
            raise RuntimeError(f"rank {self.rank}: init_inference() has not run")
        import torch.distributed as dist

        rp, stage = self.rank_plan, self.plan.stages[self.rank_plan.stage]
        own = {p.name: self.tensors[p.name] for p in rp.params if p.name in self.tensors}
        return RankContext(
            rank=self.rank, world_size=self.plan.world_size, tp=self.plan.tp, tp_rank=rp.tp_rank, pp=self.plan.pp,
            stage=rp.stage, first_stage=stage.first, last_stage=stage.last, node=rp.node, device=self.device,
            module=self.model, params=MappingProxyType(own), rank_plan=rp, tp_group=self._tp_group.group,
            world_group=dist.group.WORLD if dist.is_initialized() else None,
        )

    def run(self, fn, args: tuple, kwargs: dict):
        """``fn(ctx, *args, **kwargs)`` with this rank's ``RankContext``; its result (``LoadedModel.run``)."""
        return fn(self.context(), *args, **kwargs)

    def close(self) -> None:
        """Leave the process group (also done implicitly when the actor is killed); ``init_inference`` can
        then join a new one."""
        leave_world()

