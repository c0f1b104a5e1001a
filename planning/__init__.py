"""Planning: checkpoint index, meta skeleton, converters, TP/PP plan — pure: data in (a resolved
checkpoint, options, topology), plan out; no Ray, no socket, no file written (sources: ``workers.sources``)."""

from planning.errors import CheckpointError, ConfigError, ConversionError, MeshloadError, PlanError
from planning.plan import LoadPlan, ParamPlan, RankPlan, ReadItem
from planning.plan_json import plan_from_json, plan_to_json
from planning.planner import ResolvedModel, make_plan

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "LoadPlan",
    "MeshloadError",
    "ParamPlan",
    "PlanError",
    "RankPlan",
    "ReadItem",
    "ResolvedModel",
    "make_plan",
    "plan_from_json",
    "plan_to_json",
]
