"""The options of a load itself — the cluster, the ranks, the fetch, the plan cache — declared once.

The third option group beside ``planning.options.PlanOptions`` and ``SourceOptions``, declared the same
way (``planning.options.option``: type, default, help text, command-line flag), validated once in
``__post_init__`` with an ``OptionError`` naming the option and the value. ``orchestrator.load``'s
keywords are its fields, ``meshload load``'s flags are built from them (``orchestrator.cli``), and
``orchestrator.api`` passes the object whole.

Plain data; runs on the driver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from planning.errors import OptionError
from planning.options import FETCH_MODES, Flag, option

DEFAULT_TIMEOUT_S = 3600.0


def plan_cache_flag(text: str) -> str | bool:
    """``--plan-cache DIR``, or ``off``."""
    return False if text == "off" else text


@dataclass(frozen=True)
class LoadOptions:
    """How to load: which Ray cluster, deadlines, what each rank reserves, restarts, how nodes fetch."""

    address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS, a running cluster, or embedded)")
    timeout_s: float = option(DEFAULT_TIMEOUT_S, "seconds before a step of the load is abandoned",
                              flag=Flag(name="--timeout", parse=float, metavar="SECONDS"))
    placement_timeout_s: float = option(60.0, "seconds to wait for the cluster to place every rank",
                                        flag=Flag(name="--placement-timeout", parse=float, metavar="SECONDS"))
    progress: bool = option(True, "progress lines while nodes fetch and ranks read (--no-progress: none)", flag=Flag(name="--no-progress", switch=True, on=False))
    cpus_per_rank: float = option(1, "CPUs each rank reserves", flag=Flag(parse=float))
    gpus_per_rank: float | None = option(
        None, "device=cuda: the share of a GPU each rank reserves, in (0, 1] (default 1; below 1 ranks share GPUs)",
        flag=Flag(parse=float),
    )
    num_threads: int | None = option(None, "torch threads per rank (default: its CPUs)", flag=Flag(parse=int))
    max_restarts: int = option(2, "how many times a rank (or node fetcher) whose process dies is restarted", flag=Flag(parse=int))
    zero_copy: bool = option(True, "CPU: a shard that is one contiguous range of a file maps the page cache "
                                   "instead of being copied (--no-zero-copy: copy)",
                             flag=Flag(name="--no-zero-copy", switch=True, on=False))
    fetch: str | None = option(
        None, "Hub checkpoints: download only the byte ranges the node's ranks read (ranges, the default: "
              "$MESHLOAD_FETCH or ranges) or whole files (files)", flag=Flag(metavar="{ranges,files}"),
    )
    fetch_gap_bytes: int | None = option(
        None, "ranges closer than this are downloaded as one request (default 1 MiB; 0 = exact)",
        flag=Flag(name="--fetch-gap", parse=int, metavar="BYTES"),
    )
    plan_cache: bool | str | os.PathLike = option(
        True, "reuse plans kept in DIR (default: $MESHLOAD_PLAN_CACHE or ~/.cache/meshload/plans); 'off' to always plan",
        flag=Flag(parse=plan_cache_flag, metavar="DIR|off"),
    )
    worker_cls: type | None = option(None, "a RankWorker subclass", flag=None, no_flag="a Python class (the tests inject faults)")
    fetcher_cls: type | None = option(None, "a node fetcher subclass", flag=None, no_flag="a Python class (the tests inject faults)")

    def __post_init__(self) -> None:
        if self.address is not None and not isinstance(self.address, str):
            raise OptionError(f"address={self.address!r}: expected 'host:port', 'auto', 'embedded' or None")
        for name in ("timeout_s", "placement_timeout_s", "cpus_per_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise OptionError(f"{name}={value!r} must be a positive number")
        if self.gpus_per_rank is not None and (isinstance(self.gpus_per_rank, bool)
                                               or not isinstance(self.gpus_per_rank, (int, float))):
            raise OptionError(f"gpus_per_rank={self.gpus_per_rank!r}: expected a number in (0, 1]")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise OptionError(f"num_threads={self.num_threads!r} must be a positive integer (or None)")
        if not isinstance(self.max_restarts, int) or isinstance(self.max_restarts, bool) or self.max_restarts < 0:
            raise OptionError(f"max_restarts={self.max_restarts!r} must be a whole number >= 0")
        for name in ("progress", "zero_copy"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name}={getattr(self, name)!r}: expected True or False")
        if self.fetch is not None and self.fetch not in FETCH_MODES:
            raise OptionError(f"fetch={self.fetch!r}: expected one of {FETCH_MODES} (or None: $MESHLOAD_FETCH, else 'ranges')")
        gap = self.fetch_gap_bytes
        if gap is not None and (not isinstance(gap, int) or isinstance(gap, bool) or gap < 0):
            raise OptionError(f"fetch_gap_bytes={gap!r} must be a whole number of bytes >= 0 (or None)")
        for name in ("worker_cls", "fetcher_cls"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), type):
                raise OptionError(f"{name}={getattr(self, name)!r}: expected a class")
        if not isinstance(self.plan_cache, (bool, str, os.PathLike)):
            raise OptionError(f"plan_cache={self.plan_cache!r}: expected True, False or a folder")

    def gpus_for(self, device: str) -> float:
        """The share of a GPU each rank reserves on ``device``: ``gpus_per_rank``, else 1 on cuda and 0 on cpu."""
        share = self.gpus_per_rank
        if share is None:
            return 1 if device == "cuda" else 0
        if device != "cuda" or not 0 < share <= 1:
            raise OptionError(f"gpus_per_rank={share!r}: a fraction of one GPU in (0, 1], for device='cuda' only "
                              f"(0.5: two ranks share a GPU, as pipeline stages may; device is {device!r})")
        return share

    def fetch_options(self):
        """The node fetchers' ``workers.sources.fetch_types.FetchOptions``: the defaults, then the driver's
        environment (``$MESHLOAD_FETCH``...), then ``fetch`` and ``fetch_gap_bytes`` if given."""
        from workers.sources.fetch_types import FetchOptions

        return FetchOptions.from_env(mode=self.fetch, max_gap_bytes=self.fetch_gap_bytes)
