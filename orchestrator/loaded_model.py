"""``LoadedModel``: the ranks of a finished load, as one object on the driver.

It holds the plan that was executed, one ``RankReport`` per rank, and the live rank actors. Inference
runs where the weights live: ``logits`` and ``generate`` send the token ids to the first stage's
ranks; each stage's TP group runs transformers' own modules with collectives (torch.distributed,
gloo on CPU, NCCL on CUDA, set up on first use); activations go from stage to stage as Ray object
refs, actor to actor; only full-vocab logits come back to the driver. Greedy generation keeps the KV
cache on the ranks and sends one token per step.

A rank whose process dies between or during inference calls (or while the process group is formed)
is restored: the calls still running on the other ranks are let finish (a collective with a dead peer
fails at once; a rank still blocked after ``INFLIGHT_GRACE_S`` is restored too), the lost rank is
restarted in its bundle (re-placed if its node is gone) and reads its own bytes again
(``orchestrator.materialize``: only the lost ranks read), every rank leaves the old process group and
a new one is formed, and the call runs again from its start — a ``generate`` replays its steps from
the prompt, so the KV caches are rebuilt by the same computation and the tokens are those a run
without the fault gives. Each call restores a rank at most ``max_restarts`` times; past that, or on
any failure that is not a death, the model shuts itself down (its collectives are in an unknown
state) and the error names the ranks, their nodes and the phase. Leaving its ``with`` block —
normally or by an exception — or calling ``shutdown()`` kills every actor, removes the placement
group and, if the load started an embedded Ray cluster, stops it.

Runs on the driver. torch is imported by the methods that handle tensors, not before: a driver's load
starts its ranks without paying for torch's import (the ranks import it themselves).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from orchestrator.materialize import materialize
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
        timings: dict[str, float] | None = None, plan_cached: bool = False,
    ) -> None:
        self.plan = plan
        self.report = report
        self.timings = dict(timings or {})  # wall seconds per step of the load, on the driver
        self.plan_cached = plan_cached  # the plan was reused from the plan cache (no planning ran)
        self.timeout_s = timeout_s
        self._files = files  # where each rank reads (orchestrator.fetch_stage): a restored rank reads there again
        self._group = group
        self._connection = connection
        self._inference_ready = False
        self._inflight: dict[int, object] = {}  # rank → ref of the call the ranks are running now

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

        locals_ = self._attempt(lambda: self._group.call("local_state"), inference=False)
        return assemble_state_dict(self.plan, dict(enumerate(locals_)))

    # -- inference -----------------------------------------------------------------------------
    def _ensure_inference(self) -> None:
        if self._inference_ready:
            return
        group = self._group
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

    def _attempt(self, fn: Callable[[], T], *, inference: bool = True) -> T:
        """``fn()`` on the ranks, with lost ranks restored and ``fn`` run again from its start (see module
        docstring). A failure that is not a death propagates, shutting an inference call's model down; a
        restore that fails shuts the model down in any case."""
        self._require_live()
        self._group.reset_budget()
        try:
            while True:
                try:
                    if inference:
                        self._ensure_inference()
                    return fn()
                except Exception:
                    phase = ("inference" if self._inference_ready else "process group") if inference else "state gather"
                    try:
                        restored = self._restore(phase=phase)
                    except BaseException:
                        self.shutdown()
                        raise
                    if not restored:
                        raise
        except BaseException:
            if inference:
                self.shutdown()
            raise

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

    @staticmethod
    def _check_ids(input_ids) -> torch.Tensor:
        import torch

        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be a 2-D tensor of integer token ids, got shape {tuple(ids.shape)} {ids.dtype}")
        return ids.long()

    def logits(self, input_ids, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's output for ``input_ids`` (batch × sequence), on the driver.

        For causal LMs: full-vocabulary logits (gathered across TP ranks, padding dropped). For base
        models without a head: the last hidden state.
        """
        self._check_runnable()
        ids = self._check_ids(input_ids)
        vocab = self.plan.model.config.get("vocab_size")
        if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids must lie in [0, {vocab}); got values in [{int(ids.min())}, {int(ids.max())}]")
        return self._attempt(lambda: self._forward(ids, attention_mask=attention_mask))

    def generate(self, input_ids, *, max_new_tokens: int = 8, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding (as transformers' ``generate(do_sample=False)``), KV cache kept on the ranks.

        Returns the prompt followed by the generated tokens. Sequences that produce an end-of-sequence
        token are padded from then on; generation stops early when every sequence has ended.
        """
        self._check_runnable()
        ids = self._check_ids(input_ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        config = self.plan.model.config
        eos = config.get("eos_token_id") if eos_token_id is None else eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = config.get("pad_token_id") if pad_token_id is None else pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        # After a restore the whole generation runs again from the prompt: the caches are rebuilt step by step.
        return self._attempt(lambda: self._greedy(ids, max_new_tokens=max_new_tokens, eos=eos, pad=pad))

    def _greedy(self, ids: torch.Tensor, *, max_new_tokens: int, eos: list[int], pad: int) -> torch.Tensor:
        import torch

        finished = torch.zeros(ids.shape[0], dtype=torch.bool)
        step = ids
        for i in range(max_new_tokens):
            logits = self._forward(step, use_cache=True, reset_cache=(i == 0), last_only=True)
            nxt = logits[:, -1].float().argmax(dim=-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos:
                finished |= torch.isin(nxt, torch.tensor(eos))
                if bool(finished.all()):
                    break
            step = nxt[:, None]
        return ids

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
