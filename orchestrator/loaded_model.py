"""``LoadedModel``: the ranks of a finished load, as one object on the driver.

It holds the plan that was executed, one ``RankReport`` per rank, and the live rank actors. Leaving
its ``with`` block — normally or by an exception — or calling ``shutdown()`` kills every actor,
removes the placement group and, if the load started an embedded Ray cluster, stops it.

Runs on the driver.
"""

from __future__ import annotations

import torch

from planning.plan import LoadPlan
from workers.assemble import assemble_state_dict
from workers.report import RankReport


class LoadedModel:
    def __init__(self, plan: LoadPlan, report: list[RankReport], group, connection, *, fetch_report=None) -> None:
        self.plan = plan
        self.report = report
        self.fetch_report = fetch_report or []
        self._group = group
        self._connection = connection

    # -- state ---------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor reassembled on the driver; keys and values as transformers' own ``state_dict()``."""
        self._require_live()
        locals_ = self._group.call("local_state")
        return assemble_state_dict(self.plan, dict(enumerate(locals_)))

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
