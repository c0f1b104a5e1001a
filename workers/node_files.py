"""Open a checkpoint file on a rank's node: confined, and checked against the plan before a byte is read.

A plan is made on the driver from one copy of the checkpoint; each rank reads the copy on its own
node — the same path on every node for a local checkpoint, the node's cache for a Hub one. That copy
may be another checkpoint at the same path, a file truncated or rewritten since planning, or a link
planted to somewhere else. So before a rank reads a file it opens it here:

- the path is confined, on this node, by the rule of the plan's source (``CheckpointSource.confine``):
  a local file must resolve inside the plan's checkpoint folder (or, in a Hugging Face cache snapshot,
  to a blob of the same repo: ``planning.confinement``); a Hub file to the repo's ``blobs/`` or
  meshload's range store in this node's cache;
- the resolved file is opened with ``O_NOFOLLOW`` and must be a regular file of the plan's size;
- its header (the first ``header_size`` bytes) must hash to the plan's ``header_sha256``: another
  checkpoint's header — other tensors, shapes, dtypes or offsets — is refused naming the node.

Every later read of the rank goes through the descriptor opened here (``workers.reader.CheckpointFiles``),
so the file checked is the file read. A checkpoint with a byte-identical header (the same architecture
saved the same way, e.g. a fine-tune) cannot be told apart without hashing its data, which a rank does
not do for local files.

Runs on every rank (inside the Ray actor), over node-local files.
"""

from __future__ import annotations

import hashlib
import os
import stat

from planning.errors import CheckpointError
from planning.plan import LoadPlan
from workers.report import node_location
from workers.sources import source_of


class NodeFiles:
    """``open(name, path)`` for the files of ``plan`` on this node (see module docstring)."""

    def __init__(self, plan: LoadPlan) -> None:
        self.plan = plan
        self.files = {f.name: f for f in plan.files}

    def open(self, name: str, path: str) -> int:
        """A read-only descriptor of checkpoint file ``name`` at ``path`` (this node's copy), checked."""
        f = self.files.get(name)
        if f is None:
            raise CheckpointError(f"{name}: not a file of the plan")
        real = self._confined(name, path)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CheckpointError(f"{name}: file not found at {path} on {self._node()}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{name}: {path} on {self._node()} is not a regular file")
            if st.st_size != f.size:
                raise CheckpointError(
                    f"{name}: {path} on {self._node()} is {st.st_size} bytes but the plan was made from a copy of "
                    f"{f.size} bytes (truncated, rewritten, or another checkpoint at the same path)"
                )
            if f.header_sha256 is not None:
                raw = os.pread(fd, f.header_size, 0)
                digest = hashlib.sha256(raw).hexdigest()
                if digest != f.header_sha256:
                    raise CheckpointError(
                        f"{name}: the header of {path} on {self._node()} (sha256 {digest[:16]}…) is not the one the "
                        f"plan was made from ({f.header_sha256[:16]}…): another checkpoint at the same path, or "
                        f"the file changed since planning; plan again"
                    )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _confined(self, name: str, path: str) -> str:
        return source_of(self.plan).confine(self.plan, name, path, where=self._node())

    @staticmethod
    def _node() -> str:
        where = node_location()
        return f"node {where.get('node_ip') or where.get('host')}"
