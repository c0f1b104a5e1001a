"""The Hub's node fetcher: download what one node's ranks read of a Hub checkpoint into that node's own
cache, once per node.

Nodes of a real cluster do not share a disk, and a rank must never download the whole repo for the
slice it reads. The orchestrator runs exactly one ``NodeFetcher`` per node, on that node
(``orchestrator.fetch_stage``; it is ``HubRepo.fetcher_class()``, ``workers.sources.hub``); it computes the
node's fetch list (``planning.fetch_list``) and makes every listed file or byte range present in the
node-local cache (``workers.sources.hub_cache`` layout), then hands the ranks local paths. This module is
the coordination; the two ways a file arrives are their own modules:

- whole files: ``workers.sources.hub_whole`` (``hf_hub_download``, verified against the Hub's checksum);
- byte ranges: ``workers.sources.hub_ranges`` (HTTP range requests into the part-file store).

What it adds on top: once per node (one fetcher per node, and a file lock per file in the cache's
meshload lock folder, so two loads, or two simulated nodes sharing a folder, never fetch the same file
twice); files fetched concurrently (``FetchOptions.workers``), the first failure cancelling the rest;
progress and cancellation callable from another thread.

The plan is checked here too, on the node (``planning.validate.validate_names``): the commit, repo id,
file names and hashes that go into cache paths. The Hub token is not an argument of the actor: it is
given to ``fetch`` (the orchestrator hands it over through Ray's object store), else the node's own
``HF_TOKEN`` / stored login is used.

Offline (``offline=True``): nothing is requested; whatever is missing from the cache is named.

A fetcher killed mid-fetch (its driver killed, the OOM killer) leaves nothing half-written: a watcher
process (``workers.fetch_janitor``) removes its temporary download or unvouched part file at once.

A plain class (no Ray): the orchestrator makes it an actor on each node; tests drive it directly.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from planning.confinement import check_repo_id
from planning.errors import CheckpointError, PlanError
from planning.plan import LoadPlan
from planning.validate import validate_names
from workers.fetch_janitor import Janitor
from planning.fetch_list import FetchItem
from workers.sources import hub_cache
from workers.sources.fetch_types import FetchedFile, FetcherState, FetchOptions, NodeFetchOutcome, fetch_each
from workers.sources.http import RangeIgnored
from workers.sources.hub_common import hub_endpoint, hub_offline
from workers.sources.hub_ranges import BadPart, RangeFiles
from workers.sources.hub_whole import WholeFiles

log = logging.getLogger("meshload")


class NodeFetcher(FetcherState, WholeFiles, RangeFiles):
    """Fetch node ``node``'s share of ``plan`` (a Hub checkpoint) into this machine's cache. See module docstring.

    ``cache_dir``: else ``$MESHLOAD_CACHE_DIR`` here, else huggingface_hub's default here. ``endpoint``
    and ``offline``: default to what this process sees (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``). The plan's
    names are checked before anything is touched.
    """

    def __init__(
        self,
        plan: LoadPlan,
        node: int,
        *,
        cache_dir: str | None = None,
        endpoint: str | None = None,
        offline: bool | None = None,
        options: FetchOptions | None = None,
    ) -> None:
        if not plan.model.remote:
            raise PlanError(f"{plan.model.source}: a checkpoint read in place from {plan.model.root}; nothing to fetch")
        validate_names(plan)  # the commit, file names and hashes; the repo id, which goes into cache paths:
        try:
            check_repo_id(plan.model.source, where="plan")
        except CheckpointError as exc:
            raise PlanError(str(exc)) from None
        super().__init__(plan, node, root=hub_cache.cache_root(cache_dir), options=options)
        self.repo_id = plan.model.source
        self.commit = plan.model.revision
        self.token: str | bool | None = None
        self.endpoint = (endpoint or hub_endpoint()).rstrip("/")
        self.offline = hub_offline() if offline is None else offline
        self._locations: dict[str, str] = {}
        self._janitor = Janitor()  # removes what this process leaves half-written if it is killed mid-fetch

    # -- the fetch -----------------------------------------------------------------------------
    def fetch(self, token: str | bool | None = None) -> NodeFetchOutcome:
        """Make every item of this node present locally; returns where each file is and what it cost.

        ``token``: the Hub token (never logged); None: this node's ``HF_TOKEN`` or stored login."""
        self.token = token
        t0 = time.perf_counter()
        try:
            results = fetch_each(self.fetch_items, self._fetch_item, workers=self.options.workers, cancel=self._cancel,
                                 into=self.root)
        finally:
            self._janitor.close()
        return self._outcome(results, seconds=time.perf_counter() - t0)

    def _fetch_item(self, item: FetchItem) -> FetchedFile:
        with self._file_lock(item):
            if item.whole:
                return self._fetch_whole(item)
            for attempt in range(2):
                try:
                    return self._fetch_ranges(item)
                except RangeIgnored as exc:
                    log.warning("meshload: %s; fetching the whole file instead", exc)
                    return self._fetch_whole(item)
                except BadPart as exc:
                    if attempt == 1:
                        raise exc.args[0] from None
                    log.warning("meshload: %s; part removed, fetching its ranges again", exc.args[0])
            raise AssertionError("unreachable")

    @contextmanager
    def _file_lock(self, item: FetchItem):
        """Hold this cache's lock for ``item`` (other fetchers of the same file, in any process, wait)."""
        from filelock import Timeout

        lock = hub_cache.file_lock(self.root, self.repo_id, commit=self.commit, filename=item.file, sha256=item.sha256,
                                   timeout=self.options.lock_timeout_s)
        try:
            lock.acquire()
        except Timeout:
            raise CheckpointError(
                f"{item.file}: another process has held {lock.lock_file} for over "
                f"{self.options.lock_timeout_s:g}s while fetching it into {self.root}"
            ) from None
        try:
            yield
        finally:
            lock.release()
