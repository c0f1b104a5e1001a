"""What every node fetcher takes and returns: its options, each fetched file, the node's outcome; the
byte tally a fetch keeps (written: progress; received: cost); and the loop that fetches a node's files
concurrently (``fetch_each``).

Source-neutral: the fetch stage (``orchestrator.fetch_stage``) builds ``FetchOptions`` on the driver and
reads ``NodeFetchOutcome`` back, whatever the source (``workers.sources``). Plain data; runs anywhere.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

from planning.errors import CheckpointError, MeshloadError, PlanError
from planning.fetch_list import DEFAULT_MAX_GAP_BYTES, DEFAULT_WHOLE_ABOVE, MODES
from workers.sources.http import RetryPolicy


class Cancelled(Exception):
    """Another file of this node failed for good; stop early."""


@dataclass(frozen=True, slots=True)
class FetchOptions:
    """How a node fetches. ``mode``: ``"ranges"`` (only the bytes read, coalesced; files needed almost
    whole are fetched whole) or ``"files"`` (whole files)."""

    mode: str = "ranges"
    max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES  # ranges closer than this are fetched as one request
    whole_above: float = DEFAULT_WHOLE_ABOVE  # fetch the whole file when the ranges cover this fraction
    max_attempts: int = 6  # per file (whole) or per range piece (``retry``)
    backoff_s: float = 0.5  # first retry delay; doubles up to max_backoff_s (with jitter)
    max_backoff_s: float = 8.0
    timeout_s: float = 30.0  # per range request: connect, and silence between bytes
    workers: int = 4  # files fetched concurrently (and range requests per file)
    piece_bytes: int = 64 << 20  # a range is requested in pieces of at most this
    lock_timeout_s: float = 3600.0  # waiting for another process fetching the same file
    verify: bool = True  # sha256 of whole files against the Hub's LFS metadata

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"fetch mode {self.mode!r}: expected one of {MODES}")
        for name in ("max_attempts", "workers", "piece_bytes"):
            if getattr(self, name) < 1:
                raise PlanError(f"FetchOptions.{name}={getattr(self, name)} must be >= 1")
        if self.max_gap_bytes < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise PlanError(
                f"FetchOptions: max_gap_bytes={self.max_gap_bytes}, timeout_s={self.timeout_s}, "
                f"backoff_s={self.backoff_s} must be non-negative (timeout positive)"
            )

    @property
    def retry(self) -> RetryPolicy:
        """The one retry policy of every request of the fetch (``workers.sources.http``)."""
        return RetryPolicy(attempts=self.max_attempts, backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s)

    @staticmethod
    def from_env(**overrides) -> "FetchOptions":
        """Defaults, then the environment, then ``overrides`` that are not None.

        ``MESHLOAD_FETCH``: mode; ``MESHLOAD_FETCH_MAX_GAP``: bytes; ``MESHLOAD_FETCH_ATTEMPTS``: attempts.
        """
        values: dict = {}
        for env, key, parse in (
            ("MESHLOAD_FETCH", "mode", str),
            ("MESHLOAD_FETCH_MAX_GAP", "max_gap_bytes", int),
            ("MESHLOAD_FETCH_ATTEMPTS", "max_attempts", int),
        ):
            raw = os.environ.get(env, "").strip()
            if not raw:
                continue
            try:
                values[key] = parse(raw)
            except ValueError:
                raise PlanError(f"{env}={raw!r}: expected {'a whole number' if parse is int else 'text'}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return FetchOptions(**values)


@dataclass(frozen=True, slots=True)
class FetchedFile:
    """One file on this node: where the ranks read it, and what it cost."""

    file: str
    path: str  # a snapshot path (whole file) or a ``.part`` file (ranges)
    whole: bool
    bytes_needed: int  # planned: the file's size, or its ranges' total
    bytes_fetched: int  # received over the network for it, retries included (whole files: as huggingface_hub
    # reports it; a body cut before its first 10 MiB chunk was handed over is not seen)
    from_cache: bool  # nothing had to be fetched


@dataclass(frozen=True, slots=True)
class NodeFetchOutcome:
    node: int
    files: tuple[FetchedFile, ...]
    cache_dir: str
    seconds: float
    node_id: str
    node_ip: str
    host: str

    @property
    def bytes_fetched(self) -> int:
        return sum(f.bytes_fetched for f in self.files)


class FetcherState:
    """What every node fetcher keeps: the node's fetch items (``planning.fetch_list.node_fetch_items`` under
    ``options``), the bytes in place of them, cancellation, and where it runs — ``progress()``, ``cancel()`` and
    ``where()`` callable from another thread during ``fetch``. A source's node fetcher subclasses it."""

    def __init__(self, plan, node: int, *, root: str, options: FetchOptions | None) -> None:
        from planning.fetch_list import node_fetch_items

        if not 0 <= node < len(plan.nodes):
            raise PlanError(f"node {node} is not in the plan (nodes 0-{len(plan.nodes) - 1})")
        self.plan = plan
        self.node = node
        self.root = root
        self.options = options or FetchOptions()
        self.fetch_items = node_fetch_items(
            plan, node, mode=self.options.mode, max_gap_bytes=self.options.max_gap_bytes,
            whole_above=self.options.whole_above,
        )
        self._progress_lock = threading.Lock()
        self._done = 0
        self._cancel = threading.Event()

    def where(self) -> dict:
        from workers.report import node_location

        return {**node_location(), "cache_dir": self.root}

    def cancel(self) -> None:
        """Ask a running ``fetch`` to stop at the next file, attempt or range boundary (from another thread).

        Downloads in flight finish or fail on their own, cleaning up after themselves, which killing the
        process would not let them do.
        """
        self._cancel.set()

    def progress(self) -> tuple[int, int]:
        """(bytes in place, bytes planned) for this node; callable from another thread during ``fetch``."""
        return self._done, sum(i.nbytes for i in self.fetch_items)

    def _advance(self, n: int) -> None:
        with self._progress_lock:
            self._done += n

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    def _outcome(self, results: dict[str, FetchedFile], *, seconds: float) -> NodeFetchOutcome:
        """The node's outcome: its files in fetch-list order."""
        where = self.where()
        return NodeFetchOutcome(
            node=self.node, files=tuple(results[i.file] for i in self.fetch_items), cache_dir=self.root, seconds=seconds,
            node_id=where["node_id"], node_ip=where["node_ip"], host=where["host"],
        )


def fetch_each(items: Sequence, fetch_one: Callable[[object], FetchedFile], *, workers: int, cancel: threading.Event,
               into: str) -> dict[str, FetchedFile]:
    """``fetch_one(item)`` for each of a node's fetch items (``planning.fetch_list.FetchItem``), ``workers`` at a
    time; the first failure sets ``cancel`` (the others stop at their next boundary, raising ``Cancelled``).
    Returns each file's ``FetchedFile``; else raises the failure (one typed error as it is, several as one
    ``CheckpointError`` naming each file; ``into``: the cache, named in the message)."""
    results: dict[str, FetchedFile] = {}
    errors: dict[str, BaseException] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meshload-fetch") as pool:
        futures = {pool.submit(fetch_one, item): item for item in items}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                item = futures[fut]
                try:
                    results[item.file] = fut.result()
                except Cancelled:
                    pass
                except BaseException as exc:  # noqa: BLE001 - reported below, first one typed
                    errors[item.file] = exc
                    cancel.set()
    if not errors and len(results) < len(items):
        missing = [i.file for i in items if i.file not in results]
        raise CheckpointError(f"fetch into {into} was cancelled before {len(missing)} file(s): {missing}")
    if errors:
        first = next(iter(errors.values()))
        if len(errors) == 1 and isinstance(first, MeshloadError):
            raise first
        lines = "; ".join(f"{type(e).__name__}: {e}" for _, e in sorted(errors.items()))
        raise CheckpointError(f"{len(errors)} file(s) could not be fetched into {into}: {lines}")
    return results


class ByteCounter:
    """Stands in for the tqdm bar ``hf_hub_download`` drives: counts bytes instead of drawing them."""

    def __init__(self, *, sink: "ByteTally", **kwargs) -> None:
        self.n = kwargs.get("initial") or 0
        self.total = kwargs.get("total")
        self._sink = sink

    def update(self, n: int = 1) -> None:  # bytes written to the file
        self.n += n
        self._sink.add_written(n)

    def update_transfer(self, n: int) -> None:  # bytes received from the network
        self._sink.add_transfer(n)

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    set_transfer_postfix_str = set_postfix_str
    refresh = clear = close = set_postfix_str

    def __enter__(self) -> "ByteCounter":
        return self

    def __exit__(self, *exc) -> None:
        pass


class ByteTally:
    """Bytes of one file: written (progress) and received (cost); thread-safe."""

    def __init__(self, on_written) -> None:
        self._lock = threading.Lock()
        self.written = 0
        self.transfer = 0
        self._on_written = on_written

    def add_written(self, n: int) -> None:
        with self._lock:
            self.written += n
        self._on_written(n)

    def add_transfer(self, n: int) -> None:
        with self._lock:
            self.transfer += n
