"""Checkpoint sources: where a checkpoint lives, behind one interface, one module per source.

``planning/`` plans from data and does no I/O of a source's kind; the sources do it, on the driver
(resolve) and on each node (fetch), driven by ``orchestrator/``. The table ``SOURCES`` maps each
source's ``kind`` (recorded in every plan, ``ModelRef.kind``) to its object; a model reference goes to
the first source that claims it (``source_for``), a plan to the source of its kind (``source_of``).

| kind | module | reference | fetch for a node |
| --- | --- | --- | --- |
| ``local`` | ``workers.sources.local`` | a folder (also a Hugging Face cache snapshot folder) or a ``.safetensors`` file | none: read in place |
| ``hub`` | ``workers.sources.hub`` | ``org/name`` (``revision=``) | ``workers.sources.hub_fetcher.NodeFetcher`` into the node's cache |
| ``s3`` | ``workers.sources.s3`` | ``s3://bucket/prefix`` (S3 and compatibles; the AWS settings) | ``workers.sources.s3_fetcher.S3NodeFetcher`` into the node's cache |

What the pieces shared by sources are: ``workers.sources.part_store`` (part files and their manifests, the
pieces written into them), ``workers.sources.hub_cache`` (the node's cache root), ``planning.fetch_list``
(what a node fetches: whole files or the exact byte runs its ranks read, coalesced),
``workers.sources.fetch_types`` (a fetcher's options, state, outcome and its loop over files),
``workers.sources.http`` (the one ``RetryPolicy``), ``workers.fetch_janitor`` (removes what a killed
fetcher left half-written).

Adding a source is one new module here (and its node fetcher's, if it fetches) and one entry in
``SOURCES``; nothing in ``planning/`` or ``orchestrator/`` names a kind (``workers.sources.s3`` was added
so). The module defines a ``workers.sources.base.CheckpointSource`` subclass that provides:

1. ``kind``: a new short name, an identifier (it goes into plans), and ``remote``: True if each node
   fetches the checkpoint into its cache — then its ``ResolvedModel`` has no ``root`` and a ``revision``
   of 40 hex digits pinning the version (a commit, a fingerprint of the objects), which is what
   ``planning.validate.validate_names`` and ``planning.plan_check`` check of a remote location; the
   reference's own grammar (a repo id, a bucket) the source checks where it becomes a path;
2. ``claims(model) -> bool``: whether a reference is its own (``model.startswith("s3://")``); sources
   are asked in ``SOURCES`` order, so a claim must not overlap another's;
3. ``resolve(model, *, revision, cache_dir, token, allow_pickle) -> planning.planner.ResolvedModel``:
   list the files, read ``config.json`` and each safetensors header by range (8 bytes, then exactly the
   header; ``planning.safetensors_header`` parses them), and build the index with
   ``planning.checkpoint.index_from_headers``; every error a ``CheckpointError``/``ConfigError`` naming
   the file and the values; no tensor byte read;
4. ``resolve_plan(plan, *, cache_dir, token, allow_pickle) -> ResolvedModel``: the same for the checkpoint
   a plan names (at its pinned version, if the source has versions);
5. ``fetcher_class()``: a plain class (the orchestrator runs one per node, as a Ray actor placed in that
   node's bundle) built as ``cls(plan, node, *, cache_dir, options, **fetch_settings())`` with
   ``fetch(token) -> workers.sources.fetch_types.NodeFetchOutcome`` (each file's local path: whole, or a part file
   of the range store holding the ranges ``planning.fetch_list.node_fetch_items`` lists), ``progress()``,
   ``cancel()`` and ``where()``; it must keep the security rules of the Hub fetcher (names checked with
   ``planning.validate.validate_names``, paths confined, bytes checked against the plan's sizes and
   header digests, the token taken from the object store, a killed fetch leaves nothing half-written) —
   or return None from ``fetcher_class`` and give ``paths_in_place(plan)`` if every node reads in place;
6. ``fetch_settings()``: what fetchers take from the driver (an endpoint), else ``{}``;
7. ``confine(plan, name, path, *, where) -> str``: on a rank's node, the real path of a plan file it is
   handed, refused (``CheckpointError``) unless it lies where this source keeps its files (the folder, the
   cache's blobs and part files), so that a planted link cannot make a rank read another file.

Plain classes and functions (no Ray); resolving runs on the driver.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from planning.errors import ConfigError, PlanError
from planning.options import SourceOptions
from workers.sources.base import CheckpointSource
from workers.sources.hub import HubRepo
from workers.sources.local import LocalFolder
from workers.sources.s3 import S3Prefix

if TYPE_CHECKING:
    from planning.plan import LoadPlan
    from planning.planner import ResolvedModel

# Asked in this order: a path that exists is a local checkpoint before it could be read as a repo id.
SOURCES: dict[str, CheckpointSource] = {s.kind: s for s in (LocalFolder(), S3Prefix(), HubRepo())}


def source_for(model: str | os.PathLike) -> CheckpointSource:
    """The source that claims the reference ``model`` (a path, a repo id, a URL)."""
    path = os.fspath(model)
    for source in SOURCES.values():
        if source.claims(path):
            return source
    raise ConfigError(f"{path}: no such file or folder (and not a Hub repo id of the form 'org/name', nor s3://bucket/prefix)")


def source_of(plan: LoadPlan) -> CheckpointSource:
    """The source a plan's checkpoint comes from (by ``plan.model.kind``)."""
    try:
        source = SOURCES[plan.model.kind]
    except KeyError:
        raise ConfigError(f"plan of {plan.model.source!r}: checkpoint kind {plan.model.kind!r}, expected one of {sorted(SOURCES)}") from None
    if plan.model.remote != source.remote:
        raise PlanError(
            f"plan of {plan.model.source!r}: a {source.kind} checkpoint is "
            f"{'fetched by each node (no folder)' if source.remote else 'read in place from its folder'}, "
            f"but the plan names {'no folder' if plan.model.remote else f'the folder {plan.model.root!r}'}"
        )
    return source


def resolve_model(model: str | os.PathLike, options: SourceOptions = SourceOptions()) -> ResolvedModel:
    """Locate ``model`` with the source that claims it and index it from headers (no tensor byte read)."""
    return source_for(model).resolve(
        os.fspath(model), revision=options.revision, cache_dir=options.cache_dir, token=options.token,
        allow_pickle=options.allow_pickle,
    )


def resolve_plan_checkpoint(plan: LoadPlan, options: SourceOptions = SourceOptions()) -> ResolvedModel:
    """The checkpoint ``plan`` names, resolved now (headers read again) so that the plan can be checked
    against it (``planning.plan_check``) before anything runs; at the plan's own revision (``options.revision``
    is not used)."""
    return source_of(plan).resolve_plan(
        plan, cache_dir=options.cache_dir, token=options.token, allow_pickle=options.allow_pickle
    )


__all__ = ["SOURCES", "CheckpointSource", "resolve_model", "resolve_plan_checkpoint", "source_for", "source_of"]
