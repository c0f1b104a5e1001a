"""The local-folder source: a checkpoint folder (or one ``.safetensors`` file) every node reads in place.

Covers a folder written by ``save_pretrained``, a Hugging Face cache snapshot folder
(``.../snapshots/<commit>/``: its files are links into ``blobs/``, followed only inside the folder's
confinement, ``planning.confinement``), and a single ``.safetensors`` file next to its ``config.json``.
Resolve reads ``config.json`` and the headers (``planning.checkpoint.build_local_index``: a few KB per
file); nothing is fetched: every node reads the plan's files at the same path (a shared or copied disk),
each checked on the node before reading (``workers.node_files``).

Runs on the driver (resolve) and, for the paths, wherever the orchestrator asks.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from planning.checkpoint import build_local_index, find_checkpoint
from planning.confinement import confined_path
from planning.errors import CheckpointError, ConfigError
from planning.planner import ResolvedModel
from workers.sources.base import CheckpointSource

if TYPE_CHECKING:
    from planning.plan import LoadPlan


class LocalFolder(CheckpointSource):
    """A checkpoint on this machine's disk (see module docstring)."""

    kind = "local"

    def claims(self, model: str) -> bool:
        return os.path.exists(model)

    def resolve(
        self, model: str, *, revision: str | None = None, cache_dir: str | None = None, token: str | bool | None = None,
        allow_pickle: bool = False,
    ) -> ResolvedModel:
        root, _, _ = find_checkpoint(model)
        if not os.path.isfile(os.path.join(root, "config.json")):
            raise ConfigError(f"{root}: no config.json next to the checkpoint")
        config_path = confined_path(root, "config.json", what=root)
        try:
            with open(config_path, encoding="utf-8") as f:
                config_dict = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid JSON ({exc})") from None
        index = build_local_index(model, allow_pickle=allow_pickle)
        return ResolvedModel(model, self.kind, root, None, config_dict, index)

    def resolve_plan(
        self, plan: LoadPlan, *, cache_dir: str | None = None, token: str | bool | None = None, allow_pickle: bool = False
    ) -> ResolvedModel:
        """From the plan's folder (through the path it was planned from, when that still leads to the same
        folder). A pickle checkpoint needs ``allow_pickle`` here too."""
        m = plan.model
        if m.checkpoint_format == "pickle" and not allow_pickle:
            raise CheckpointError(
                f"the plan of {m.source!r} reads a pickle checkpoint in {m.root}; pass allow_pickle=True to load it "
                f"(it is read with torch.load(weights_only=True))"
            )
        source = m.root
        try:
            if os.path.exists(m.source) and find_checkpoint(m.source)[0] == m.root:
                source = m.source  # e.g. a single .safetensors file next to others
        except CheckpointError:
            pass
        try:
            if not self.claims(source):
                raise ConfigError(f"{source}: no such file or folder")
            return self.resolve(source, allow_pickle=allow_pickle)
        except (CheckpointError, ConfigError) as exc:
            raise type(exc)(f"the plan names the checkpoint folder {m.root}, which cannot be resolved: {exc}") from None

    def confine(self, plan: LoadPlan, name: str, path: str, *, where: str) -> str:
        """Inside the plan's checkpoint folder (``planning.confinement``: in a Hugging Face cache snapshot, a
        blob of the same repo), and exactly that file."""
        m = plan.model
        real = confined_path(m.root, name, what=f"{where}: {m.root}")
        if os.path.realpath(path) != real:
            raise CheckpointError(f"{name}: asked to read {path}, which is not {name} of {m.root}")
        return real

    def paths_in_place(self, plan: LoadPlan) -> dict[str, str]:
        return {f.name: os.path.join(plan.model.root, f.name) for f in plan.files}
