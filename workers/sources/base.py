"""The interface every checkpoint source implements: resolve on the driver, fetch for a node on that node.

A source is where a checkpoint lives (a local folder, a Hub repo, an object-store prefix). Its two jobs,
the same two as torch DCP's ``StorageReader`` (read the metadata, then read the bytes a rank asks for):

- **resolve** (on the driver): the file listing, ``config.json`` and every safetensors header (read
  by range, never a tensor byte) → a ``planning.planner.ResolvedModel``, the data ``planning/`` plans
  from; and the same again for a plan made earlier, to check it against the checkpoint as it is now;
- **fetch for a node** (on each node, as a Ray actor the orchestrator places there): the byte ranges or
  whole files that node's ranks read, into that node's part-file store (``workers.sources.part_store``),
  returning where each file is (``workers.sources.fetch_types.NodeFetchOutcome``). A source whose files
  every node can already read where they are (a local folder) fetches nothing and says where they are.

Plain classes (no Ray): the orchestrator drives them (``orchestrator.fetch_stage``), tests call them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from planning.plan import LoadPlan
    from planning.planner import ResolvedModel


class CheckpointSource(ABC):
    """One kind of checkpoint location; ``kind`` is what ``ModelRef.kind`` records in a plan."""

    kind: ClassVar[str]
    # Fetched by each node into its own cache (a ``fetcher_class``), the plan naming it by reference and a pinned
    # version with no folder (``ModelRef.remote``); False: read in place from the plan's folder (``paths_in_place``).
    remote: ClassVar[bool] = False

    @abstractmethod
    def claims(self, model: str) -> bool:
        """Whether the reference ``model`` (a path, a repo id, a URL) names a checkpoint of this source."""

    @abstractmethod
    def resolve(
        self, model: str, *, revision: str | None, cache_dir: str | None, token: str | bool | None, allow_pickle: bool
    ) -> ResolvedModel:
        """List the checkpoint, read its config and its headers (by range): the data planning needs."""

    @abstractmethod
    def resolve_plan(
        self, plan: LoadPlan, *, cache_dir: str | None, token: str | bool | None, allow_pickle: bool
    ) -> ResolvedModel:
        """The checkpoint ``plan`` was made from, resolved now (at the plan's revision, if the source has them)."""

    @abstractmethod
    def confine(self, plan: LoadPlan, name: str, path: str, *, where: str) -> str:
        """The real path of plan file ``name`` handed to a rank at ``path`` on this node (``where``), if it lies
        where this source keeps it, else a ``CheckpointError``: checked before the rank opens it
        (``workers.node_files``), so that a planted link cannot make a rank read another file."""

    def fetcher_class(self) -> type | None:
        """The per-node fetcher: a plain class ``(plan, node, *, cache_dir, options, **fetch_settings())`` with
        ``fetch(token) -> NodeFetchOutcome``, ``progress() -> (done, total)``, ``cancel()`` and ``where()``.
        None: every node reads the files in place (``paths_in_place``)."""
        return None

    def fetch_settings(self) -> dict:
        """What the node fetchers take from the driver rather than their own environment (e.g. the endpoint)."""
        return {}

    def paths_in_place(self, plan: LoadPlan) -> dict[str, str]:
        """For a source that fetches nothing: each plan file's path, the same on every node."""
        raise NotImplementedError(f"{type(self).__name__} fetches its files; it has no paths in place")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r})"


def looks_like_path(model: str) -> bool:
    """A reference written as a path (``./x``, ``/x``, ``~/x``): never a repo id or URL."""
    return model.startswith((".", os.sep, "/", "~"))
