"""The modules a rank's process needs, for Ray to import in its idle workers before any load asks.

A rank lands in a Ray worker process. In a fresh process its first seconds go to imports: torch
(2-3 s on an H200 host), then transformers' model code (5-8 s there: it pulls in
``torch.distributed.tensor``, dynamo, sympy), which the rank needs to build the model around the
weights it read. Ray can do those imports ahead of time: a node started with
``RAY_preload_python_modules`` (Ray's ``preload_python_modules`` setting) imports the listed modules
in every worker process it starts, and the workers it starts idle, ready for the next job (one per
CPU, when the first driver connects), wait with them already imported. A rank given such a worker
starts at once, and builds its model right after its reads instead of after an import.

The catch, said where users set it (README, ``cluster_configs/``): a worker Ray starts on demand, when
no idle one is left, does the imports before its rank runs, so a rank whose plan came from the plan
cache reads its weights after transformers' import rather than before it (same time to first
logits, weights later). And Ray starts the idle workers when the first driver connects, not with the
node: the configs connect one right after ``ray start`` so that the first load finds them ready.

Runs wherever a Ray node is started (the value of the setting) and in each rank (``preloaded``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

# In the order they are imported; each one a prefix of what the next needs.
PRELOAD_MODULES: tuple[str, ...] = ("torch", "transformers.modeling_utils", "workers.rank_worker")
PRELOAD_ENV = "RAY_preload_python_modules"


def preload_env() -> dict[str, str]:
    """The environment variable to start a Ray node with (``ray start``), as a mapping."""
    return {PRELOAD_ENV: ",".join(PRELOAD_MODULES)}


def preloaded() -> bool:
    """Whether transformers' model code is imported in this process (a preloaded worker) — done, not under
    way on another thread (a module is in ``sys.modules`` from the start of its import)."""
    module = sys.modules.get("transformers.modeling_utils")
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


@contextmanager
def gil_switch_interval(seconds: float) -> Iterator[None]:
    """Python's thread switch interval set to ``seconds`` for the block (process-wide), then restored."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
