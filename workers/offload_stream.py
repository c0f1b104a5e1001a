"""Stream a rank's offloaded layers to its device for the forward, one layer ahead.

A layer whose tensors the plan offloads (``planning.offload``) keeps them in host memory or on disk
(``workers.offload_store``). A forward pre-hook on the layer puts device copies in place of its offloaded
parameters (``param.data`` swapped, so every module — TP collectives included — sees them through its
usual attributes) and starts copying the next offloaded layer, in the stage's layer order, on a
background thread; a forward hook (run before any other, so the pipeline's stop hook on a stage's last
layer cannot skip it) puts the host tensors back and lets the device copies go. At most two offloaded
layers are on the device at once: the one computing and the one being prefetched — the room the plan
reserves (``planning.offload.stream_bytes``). After the stage's last offloaded layer, its first one is
prefetched for the next forward (the next token of a ``generate``).

On a GPU the copies run on a stream of their own (from page-locked memory for "cpu" tensors: DMA that
overlaps the compute), and the compute stream waits for each layer's copies only when it reaches the
layer. On the CPU the "device" is host memory with a budget: a copy is a clone, made on the background
thread, so placement, budgets and the prefetch order are the same code CI runs. Disk tensors' pages are
dropped from the rank's resident memory once copied (``OffloadStore.release``), and so are those of the
other offloaded views of the same file within a folio's reach of them (``folio_reach``): a kernel with
large page-cache folios maps those along with the pages the copy read.

Runs on every rank whose plan offloads something, around ``StageRunner`` (installed by ``RankWorker``).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from planning.pipeline import layer_of
from planning.plan import LoadPlan, RankPlan
from workers.offload_store import OffloadStore, folio_reach


class LayerStreamer:
    """See module docstring. ``tensors``: the rank's host tensors by name (what the model holds at rest)."""

    def __init__(self, model: torch.nn.Module, plan: LoadPlan, rank_plan: RankPlan, *, device: torch.device,
                 store: OffloadStore, tensors: dict[str, torch.Tensor]) -> None:
        self.device = device
        self.store = store
        layers = model.get_submodule(plan.layers_path)
        per_layer: dict[int, list[tuple[str, torch.nn.Parameter | torch.Tensor, torch.Tensor]]] = {}
        for p in rank_plan.params:
            if p.offload is None or not p.owns_storage:
                continue
            module_name, _, leaf = p.name.rpartition(".")
            module = model.get_submodule(module_name)
            holder = module._buffers if p.is_buffer else module._parameters
            per_layer.setdefault(layer_of(p.name, plan.layers_path), []).append((p.name, holder[leaf], tensors[p.name]))
        self.order = sorted(per_layer)
        self._layers = per_layer
        self._neighbours = self._file_neighbours(per_layer, folio_reach())
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshload-offload")
        self._pending: dict[int, Future] = {}
        self._resident: set[int] = set()  # layers whose device copies are in place
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._hooks = []
        for i in self.order:
            self._hooks.append(layers[i].register_forward_pre_hook(self._before(i)))
            self._hooks.append(layers[i].register_forward_hook(self._after(i), prepend=True))
        self.streamed_bytes = 0  # bytes copied to the device so far

    # -- copies, on the background thread ------------------------------------------------------
    def _copy(self, i: int):
        out = []
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                for name, _, host in self._layers[i]:
                    dev = torch.empty_like(host, device=self.device)
                    dev.copy_(host, non_blocking=host.is_pinned())
                    out.append(dev)
                event = torch.cuda.Event()
                event.record(self._stream)
            event.synchronize()  # the pages may be dropped only once the copy has read them
        else:
            out = [host.clone() for _, _, host in self._layers[i]]
            event = None
        for name, _, host in self._layers[i]:
            self.store.release(name, host)
            self.streamed_bytes += host.numel() * host.element_size()
        for name, host in self._neighbours[i]:
            self.store.release(name, host)
        return out, event

    def _file_neighbours(self, per_layer, reach: int) -> dict[int, list[tuple[str, torch.Tensor]]]:
        """Layer → the other layers' checkpoint views that lie within ``reach`` bytes of one of its own in the
        same map of the same file (the pages that reading the layer may map along with its own)."""
        by_file: dict[str | None, list[tuple[int, int, int, str, torch.Tensor]]] = {}
        for i, entries in per_layer.items():
            for name, _, host in entries:
                file = self.store.file_of(name)
                if file is not None and host.numel():
                    start = host.data_ptr()
                    by_file.setdefault(file, []).append((start, start + host.numel() * host.element_size(), i, name, host))
        out: dict[int, dict[str, torch.Tensor]] = {i: {} for i in per_layer}
        for views in by_file.values():
            views.sort(key=lambda v: v[0])
            for k, (start, end, i, _, _) in enumerate(views):
                for other in views[k + 1:]:  # sorted by start: the first one beyond reach ends the search
                    if other[0] - end >= reach:
                        break
                    if other[2] != i:
                        out[i][other[3]] = other[4]
                        out[other[2]][views[k][3]] = views[k][4]
        return {i: list(d.items()) for i, d in out.items()}

    def _prefetch(self, i: int) -> None:
        if i not in self._pending and i not in self._resident:
            self._pending[i] = self._pool.submit(self._copy, i)

    # -- hooks, on the forward's thread ------------------------------------------------------------
    def _before(self, i: int):
        def hook(module, args):
            if i == self.order[0]:
                self.restore()  # a forward that failed half-way left layers on the device
            self._prefetch(i)
            copies, event = self._pending.pop(i).result()
            current = torch.cuda.current_stream(self.device) if self._stream is not None else None
            if current is not None:
                current.wait_event(event)
            for (_, param, _), dev in zip(self._layers[i], copies):
                if current is not None:
                    dev.record_stream(current)  # freed after the layer's kernels, not when the hook returns
                param.data = dev
            self._resident.add(i)
            k = self.order.index(i)
            self._prefetch(self.order[(k + 1) % len(self.order)])
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            self._put_back(i)
        return hook

    def _put_back(self, i: int) -> None:
        for _, param, host in self._layers[i]:
            param.data = host
        self._resident.discard(i)

    def restore(self) -> None:
        """Every offloaded parameter back on its host tensor."""
        for i in list(self._resident):
            self._put_back(i)

    def close(self) -> None:
        """Drop prefetched copies and stop the background thread; the parameters stay on their host tensors."""
        self.restore()
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
        for h in self._hooks:
            h.remove()
