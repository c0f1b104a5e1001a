"""``LoadedModel``: the ranks of a finished load, as one object on the driver.

It holds the plan that was executed, one ``RankReport`` per rank, and the live rank actors. Inference
runs where the weights live: ``logits`` and ``generate`` send the token ids to the first stage's
ranks; each stage's TP group runs transformers' own modules with collectives (torch.distributed,
gloo on CPU, NCCL on CUDA, set up on first use); activations go from stage to stage as Ray object
refs, actor to actor; only full-vocab logits come back to the driver. ``generate`` / ``stream``
(greedy or sampled, ``workers.decoding``) keep the KV cache on the ranks; a model of one stage decodes
on the ranks by themselves (rank 0 streams the tokens to the driver, no round trip per token), pipeline
stages step by step from the driver. ``run`` calls a user's function on the ranks; ``update_weights``
reads another checkpoint of the same model into their storage (``orchestrator.weight_update``).

A rank whose process dies between or during inference calls (or while the process group is formed)
is restored: the calls still running on the other ranks are let finish (a collective with a dead peer
fails at once; a rank still blocked after ``INFLIGHT_GRACE_S`` is restored too), the lost rank is
restarted in its bundle (re-placed if its node is gone) and reads its own bytes again
(``orchestrator.materialize``: only the lost ranks read), every rank leaves the old process group and
a new one is formed, and the call runs again from its start — a ``generate`` replays its steps from
the prompt, so the KV caches are rebuilt by the same computation and the tokens are those a run
without the fault gives (a stream skips the tokens it has already handed out). Each call restores a
rank at most ``max_restarts`` times; past that, or on any failure that is not a death, the model shuts
itself down (its collectives are in an unknown state) and the error names the ranks, their nodes and
the phase (a user's function raising in ``run`` is the exception: see ``run``). Leaving its ``with`` block —
normally or by an exception — or calling ``shutdown()`` kills every actor, removes the placement
group and, if the load started an embedded Ray cluster, stops it.

Runs on the driver. torch is imported by the methods that handle tensors, not before: a driver's load
starts its ranks without paying for torch's import (the ranks import it themselves).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from orchestrator.materialize import materialize
from orchestrator.weight_update import WeightsUpdate, reload_ranks
from planning.options import SourceOptions
from planning.plan import LoadPlan
from workers.report import RankReport

if TYPE_CHECKING:
    import torch

log = logging.getLogger("meshload")

INFLIGHT_GRACE_S = 15.0  # after a failed call, how long the other ranks' calls get to end before they count as stuck
T = TypeVar("T")


class LoadedModel:
    def __init__(
        self, plan: LoadPlan, report: list[RankReport], group, connection, *, files, timeout_s: float = 600.0,
        timings: dict[str, float] | None = None, plan_cached: bool = False, planned_on: str = "driver",
        rank_files: Callable[[LoadPlan], object], source_options: SourceOptions = SourceOptions(),
    ) -> None:
        self.plan = plan
        self.report = report
        self.timings = dict(timings or {})  # wall seconds per step of the load, on the driver
        self.plan_cached = plan_cached  # the plan was reused from the plan cache (no planning ran)
        self.planned_on = planned_on  # "driver", or "rank 0" when a preloaded rank planned first
        self.timeout_s = timeout_s
        self._files = files  # where each rank reads (orchestrator.fetch_stage): a restored rank reads there again
        self._rank_files = rank_files  # plan → where each rank reads it (update_weights' new checkpoint)
        self._source_options = source_options  # cache_dir, token, allow_pickle: resolving a new checkpoint
        self._group = group
        self._connection = connection
        self._inference_ready = False
        self._inflight: dict[int, object] = {}  # rank → ref of the call the ranks are running now
        self._busy = False  # a call (or an open stream) is using the ranks: one at a time

    @property
    def fetch_report(self) -> list:
        """Hub loads: what each node fetched (``NodeFetchReport``), refetches after a re-placement included."""
        return self._files.report

    @property
    def keys(self):
        """transformers' loading report (``planning.key_report.KeyReport``): checkpoint tensors not loaded,
        model tensors left at their initialised value, and those the model class declares ignorable."""
        return self.plan.keys

    # -- state ---------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor reassembled on the driver; keys and values as transformers' own ``state_dict()``."""
        from workers.assemble import assemble_state_dict

        locals_ = self._attempt(lambda: self._group.call("local_state"), process_group=False, phase="state gather",
                                shutdown_on_failure=False)
        return assemble_state_dict(self.plan, dict(enumerate(locals_)))

    # -- inference -----------------------------------------------------------------------------
    def _ensure_inference(self) -> None:
        if self._inference_ready:
            return
        group = self._group
        t0 = time.perf_counter()
        (address,) = group.call("pick_port", ranks=[0])
        ips = set(group.where.values())
        loopback = all(ip.startswith("127.") for ip in ips)
        self._inflight = group.submit(
            "init_inference",
            address[0],
            address[1],
            # NCCL only where TP collectives run on GPUs; pipeline stages alone (tp=1) pass activations
            # through Ray, and may share one GPU (NCCL refuses two ranks on one device).
            backend="nccl" if self.plan.device == "cuda" and self.plan.tp > 1 else "gloo",
            collective_timeout_s=self.timeout_s,
            socket_ifname="lo" if loopback else None,
        )
        group.wait(self._inflight, what="init_inference", timeout_s=self.timeout_s)
        self._inflight = {}
        self._inference_ready = True
        self.timings["inference set-up"] = time.perf_counter() - t0

    def _forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """One forward through every stage; returns the last stage's output (on the driver)."""
        group, previous, refs = self._group, None, {}
        for stage in self.plan.stages:
            ranks = [r.rank for r in self.plan.ranks if r.stage == stage.stage]
            stage_refs = group.submit("forward_step", input_ids, previous, ranks=ranks, **kwargs)
            previous = stage_refs[ranks[0]]  # TP rank 0's output feeds every rank of the next stage
            refs.update(stage_refs)
        self._inflight = refs
        results = group.wait(refs, what="forward_step", timeout_s=self.timeout_s)
        self._inflight = {}
        return results[self._last_stage_rank0()]

    def _attempt(self, fn: Callable[[], T], **options) -> T:
        """``fn()`` on the ranks, with lost ranks restored and ``fn`` run again from its start (``_replayed``)."""
        def once() -> Iterator[T]:
            yield fn()

        (result,) = self._replayed(once, **options)
        return result

    def _replayed(self, produce: Callable[[], Iterator[T]], *, phase: str = "inference", process_group: bool = True,
                  shutdown_on_failure: bool = True, user_code: bool = False) -> Iterator[T]:
        """The items of ``produce()`` (work on the ranks), with lost ranks restored and ``produce()`` run
        again from its start, the items already handed out skipped (see module docstring: the work is
        deterministic, so a replay yields them again). ``process_group``: the work needs the ranks' process
        group (formed first). A failure that is not a death propagates, shutting the model down if
        ``shutdown_on_failure`` (its collectives, or its weights, are in an unknown state); a restore that
        fails shuts the model down in any case. ``user_code``: the work runs a user's function (``run``),
        whose own errors are the user's: no rank died, so the ranks still blocked behind the failed ones
        (in a collective with them) are restored and the model stays usable."""
        self._require_live()
        if self._busy:
            raise RuntimeError("a stream of this model is still open: read it to its end or close() it before another call")
        self._busy = True
        self._group.reset_budget()
        keep = not shutdown_on_failure
        delivered = 0
        try:
            while True:
                try:
                    if process_group:
                        self._ensure_inference()
                    with contextlib.closing(produce()) as items:  # a stream left early stops its work
                        for i, item in enumerate(items):
                            if i >= delivered:
                                delivered += 1
                                yield item
                    return
                except Exception:
                    failed_in = phase if self._inference_ready or not process_group else "process group"
                    try:
                        if user_code and self._inference_ready and not self._group.dead_ranks(self._group.ranks):
                            self._restore(phase=failed_in)
                            keep = True
                            raise
                        restored = self._restore(phase=failed_in)
                    except BaseException:
                        if not (user_code and keep):
                            self.shutdown()
                        raise
                    if not restored:
                        raise
        except GeneratorExit:  # the caller stopped reading: not a failure
            raise
        except BaseException:
            if not keep:
                self.shutdown()
            raise
        finally:
            self._busy = False

    def _restore(self, *, phase: str) -> bool:
        """After a failed call: restore the ranks that died (or are stuck behind a dead one); False if none did."""
        import ray

        group = self._group
        refs, self._inflight = self._inflight, {}
        stuck: set[int] = set()
        if refs:
            _, not_ready = ray.wait(list(refs.values()), num_returns=len(refs), timeout=INFLIGHT_GRACE_S)
            stuck = {r for r, ref in refs.items() if ref in not_ready}
        dead = group.dead_ranks(group.ranks) | stuck
        if not dead:
            return False
        group.revive(sorted(dead), phase=phase)  # past the budget: RankError naming the rank, its node and the phase
        # every rank forms the process group again: the others leave the old one
        _, errors = group.call_each("close", ranks=[r for r in group.ranks if r not in dead], timeout_s=INFLIGHT_GRACE_S)
        if errors:
            dead |= group.settle(errors, phase="process group")
        self._inference_ready = False
        reports = materialize(self.plan, group, self._files, progress=False, ranks=sorted(dead))
        for r, report in reports.items():
            self.report[r] = report
        log.warning("meshload: rank(s) %s restored after dying during %s; running the call again", sorted(dead), phase)
        return True

    def _last_stage_rank0(self) -> int:
        return next(r.rank for r in self.plan.ranks if r.stage == self.plan.pp - 1)

    def _check_runnable(self) -> None:
        """FP8 layers run transformers' CUDA kernels; on CPU they run only dequantized (as transformers runs them)."""
        q = self.plan.quantization
        if q is not None and not q.dequantize and self.plan.device != "cuda":
            from planning.errors import PlanError

            raise PlanError(
                f"{self.plan.model.source}: its {q.method} layers hold quantized weights, whose matmuls need CUDA "
                f"(transformers' kernels); on device={self.plan.device!r} load it with "
                f"quantization=FineGrainedFP8Config(dequantize=True) to run it (the weights are read as published, "
                f"then dequantized on each rank)"
            )

    def _check_ids(self, input_ids) -> torch.Tensor:
        import torch

        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be a 2-D tensor of integer token ids, got shape {tuple(ids.shape)} {ids.dtype}")
        vocab = self.plan.model.config.get("vocab_size")
        if vocab is not None and ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids must lie in [0, {vocab}); got values in [{int(ids.min())}, {int(ids.max())}]")
        return ids.long()

    def logits(self, input_ids, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's output for ``input_ids`` (batch × sequence), on the driver.

        For causal LMs: full-vocabulary logits (gathered across TP ranks, padding dropped). For base
        models without a head: the last hidden state.
        """
        self._check_runnable()
        ids = self._check_ids(input_ids)
        return self._attempt(lambda: self._forward(ids, attention_mask=attention_mask))

    def generate(
        self, input_ids, *, attention_mask=None, max_new_tokens: int = 8, eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
        top_p: float | None = None, seed: int | None = None,
    ) -> torch.Tensor:
        """Decode as transformers' ``generate`` does, the KV cache kept on the ranks; returns the prompts
        followed by the generated tokens (batch × (prompt + new)).

        Greedy by default (``do_sample=False``); ``do_sample=True`` samples with ``temperature``, ``top_k``,
        ``top_p`` (transformers' own warpers, in its order) from a generator seeded with ``seed`` — the same
        seed gives the same tokens, run after run (``None``: a fresh seed per call). A batch of prompts of
        different lengths is left-padded, with ``attention_mask`` (1: token, 0: padding). Sequences that
        produce a stop token (``eos_token_id``: an id or a list; default the config's) are padded with
        ``pad_token_id`` from then on; decoding ends when every sequence has stopped or after
        ``max_new_tokens``. See ``stream`` for the tokens as they are produced, and docs/USING.md."""
        import torch

        ids, mask, decoding = self._decoding_of(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, do_sample=do_sample,
                                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        steps = list(self._tokens(ids, mask, decoding))
        return torch.cat([ids, torch.stack(steps, dim=1)], dim=1)

    def stream(
        self, input_ids, *, attention_mask=None, max_new_tokens: int = 8, eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
        top_p: float | None = None, seed: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """``generate``'s tokens as they are produced: one tensor of shape (batch,) per step. Arguments are
        checked at once; the decoding starts when the iterator is first read. Leaving the loop early (or
        closing the iterator) stops the ranks after their current step."""
        ids, mask, decoding = self._decoding_of(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, do_sample=do_sample,
                                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return self._tokens(ids, mask, decoding)

    def _decoding_of(self, input_ids, attention_mask, *, eos_token_id, pad_token_id, seed, **options):
        """The checked prompt, mask and ``Decoding`` of a ``generate``/``stream`` call."""
        import secrets

        import torch

        from workers.decoding import Decoding

        self._check_runnable()
        ids = self._check_ids(input_ids)
        mask = None
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask)
            if tuple(mask.shape) != tuple(ids.shape) or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"attention_mask must be 0/1 of the prompts' shape {tuple(ids.shape)}, got shape "
                                 f"{tuple(mask.shape)}")
            mask = mask.long()
            bad = [b for b in range(mask.shape[0]) if not bool((mask[b, 1:] >= mask[b, :-1]).all()) or not bool(mask[b].any())]
            if bad:
                raise ValueError(f"attention_mask rows {bad}: prompts must be left-padded (zeros, then ones; at least one token)")
        config = self.plan.model.config
        eos = config.get("eos_token_id") if eos_token_id is None else eos_token_id
        eos = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
        pad = config.get("pad_token_id") if pad_token_id is None else pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        decoding = Decoding(eos=eos, pad=pad, seed=secrets.randbits(63) if seed is None else seed,
                            vocab_size=config.get("vocab_size"), **options)
        return ids, mask, decoding

    def _tokens(self, ids, mask, decoding) -> Iterator[torch.Tensor]:
        """The tokens of each step; after a restore the generation runs again from the prompt (the KV caches
        are rebuilt step by step, the same seed draws the same tokens) and the steps already handed out are
        skipped."""
        if self.plan.pp == 1:
            return self._replayed(lambda: self._decode_on_ranks(ids, mask, decoding))
        return self._replayed(lambda: self._decode_through_driver(ids, mask, decoding))

    def _decode_on_ranks(self, ids, mask, decoding) -> Iterator[torch.Tensor]:
        """One stage: the ranks run the whole generation by themselves (``RankWorker.decode``); rank 0 streams
        its tokens to the driver, the other ranks' calls are watched for failures."""
        group = self._group
        others = group.submit("decode_quietly", ids, mask, decoding, ranks=group.ranks[1:])
        tokens = group.stream("decode", 0, ids, mask, decoding)
        self._inflight = {0: tokens.completed(), **others}
        try:
            while True:
                try:
                    yield group.next_streamed(tokens, rank=0, watch=others, what="decode", timeout_s=self.timeout_s)
                except StopIteration:
                    break
        except GeneratorExit:  # left early by the caller: rank 0 tells the others to stop after this step
            try:
                group.call("stop_decoding", ranks=[0])
                group.wait(self._inflight, what="decode", timeout_s=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - the next call restores what is broken
                log.warning("meshload: the ranks did not stop decoding cleanly (%s); the next call restores them", exc)
            self._inflight = {}
            raise
        group.wait(self._inflight, what="decode", timeout_s=self.timeout_s)
        self._inflight = {}

    def _decode_through_driver(self, ids, mask, decoding) -> Iterator[torch.Tensor]:
        """Pipeline stages: each step goes stage to stage (activations as Ray object refs) and the driver
        chooses the token from the last stage's logits."""
        from workers.decoding import Decoder

        decoder = Decoder(ids, mask, decoding)  # position ids are dropped by ranks whose model takes none
        while not decoder.done:
            step_ids, kwargs = decoder.inputs()
            logits = self._forward(step_ids, use_cache=True, reset_cache=decoder.steps == 0, last_only=True, **kwargs)
            yield decoder.advance(decoder.choose(logits[:, -1]))

    # -- new weights -----------------------------------------------------------------------------
    def update_weights(self, checkpoint: str | os.PathLike, *, revision: str | None = None) -> WeightsUpdate:
        """Read ``checkpoint`` — the same model with other values (a training or RL run's next step) — into
        the ranks' existing storage; returns a ``WeightsUpdate`` (timings, bytes per rank).

        ``checkpoint`` is what ``load`` takes (a folder, a ``.safetensors`` file, a Hub repo id with
        ``revision``). The loaded plan is re-made against it (``planning.retarget``) and refused with a
        ``PlanError`` naming the tensor and the values if a fresh load would plan anything else (another
        config, a tensor missing or of another shape or dtype, a tensor the model would load that the
        plan does not) — then nothing has changed. Hub checkpoints are fetched by each node first (its
        ranges only). Each rank then reads only its own byte ranges straight into the tensors its module
        computes with (no allocation: every parameter keeps its storage), tied tensors go to the other
        stage again, tensors the checkpoint never held keep their initialised value, and the KV cache is
        dropped. A rank that dies meanwhile is restored (it loads the new checkpoint) and the reload runs
        again; any other failure while the ranks read (a truncated file) leaves some ranks with old values
        and shuts the model down, naming the ranks, nodes and phase."""
        import time

        from planning.retarget import retarget_plan
        from workers.sources import resolve_model

        self._require_live()
        t0 = time.perf_counter()
        resolved = resolve_model(checkpoint, replace(self._source_options, revision=revision))
        new_plan = retarget_plan(self.plan, resolved)
        t_plan = time.perf_counter()
        files = self._rank_files(new_plan)
        files.fetch()
        t_fetch = time.perf_counter()

        def reload() -> dict[int, int]:
            self.plan, self._files = new_plan, files  # what restored ranks load from now on
            return reload_ranks(new_plan, self._group, files)

        bytes_read = self._attempt(reload, phase="update weights", process_group=False)
        return WeightsUpdate(
            source=new_plan.model.source, seconds=time.perf_counter() - t0, plan_seconds=t_plan - t0,
            fetch_seconds=t_fetch - t_plan, bytes_read=tuple(bytes_read[r] for r in self._group.ranks),
            bytes_fetched=tuple(files.bytes_fetched(r) for r in self._group.ranks),
        )

    # -- the user's code -----------------------------------------------------------------------
    def run(self, fn: Callable[..., T], *args, ranks: Sequence[int] | None = None, **kwargs) -> list[T]:
        """``fn(ctx, *args, **kwargs)`` on every rank (or on ``ranks``), all at once; their results in rank
        order. ``ctx`` is the rank's ``workers.rank_context.RankContext``: its local transformers module
        (TP collectives installed), its tensors by name, its TP/PP coordinates, device and process groups.

        ``fn`` and its arguments travel to the ranks with cloudpickle (Ray's serialiser): a function of a
        module the ranks cannot import is best defined inside a function, or registered with
        ``ray.cloudpickle.register_pickle_by_value``. Its results must be picklable; tensors come back as
        copies. Errors raised by ``fn`` come back grouped, each with its rank, node and ``[during run]``;
        the model stays usable (ranks still blocked in a collective with a rank that raised are restored,
        as after a death). A rank that dies while ``fn`` runs is restored and ``fn`` runs again from its
        start on every chosen rank, as ``logits`` and ``generate`` do. A collective over a group some of
        whose ranks are not chosen waits for them until the load's ``timeout_s``."""
        if not callable(fn):
            raise TypeError(f"run() needs a callable fn(ctx, ...), got {type(fn).__name__}")
        chosen = self._chosen_ranks(ranks)

        def call() -> list[T]:
            refs = self._group.submit("run", fn, args, kwargs, ranks=chosen)
            self._inflight = refs
            results = self._group.wait(refs, what="run", timeout_s=self.timeout_s)
            self._inflight = {}
            return [results[r] for r in chosen]

        return self._attempt(call, phase="run", user_code=True)

    def _chosen_ranks(self, ranks: Sequence[int] | None) -> list[int]:
        world = self.plan.world_size
        if ranks is None:
            return list(range(world))
        bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < world]
        chosen = sorted(set(ranks))
        if bad or not chosen:
            raise ValueError(f"ranks={list(ranks)!r}: expected rank numbers in [0, {world}) (world size {world})")
        return chosen

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._group is not None

    def _require_live(self) -> None:
        if self._group is None:
            raise RuntimeError("this LoadedModel was shut down; its ranks no longer exist")

    def shutdown(self) -> None:
        """Kill every rank actor, remove the placement group, stop an embedded cluster. Idempotent."""
        group, connection = self._group, self._connection
        self._group = self._connection = None
        try:
            if group is not None:
                group.shutdown()
        finally:
            if connection is not None:
                connection.close()

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "live" if self.alive else "shut down"
        return (
            f"LoadedModel({self.plan.model.class_name} from {self.plan.model.source!r}, tp={self.plan.tp}, "
            f"pp={self.plan.pp}, nodes={self.plan.num_nodes}, {state})"
        )
