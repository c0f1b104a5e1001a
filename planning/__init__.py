"""Planning: checkpoint index, meta skeleton, converters, TP/PP plan — pure, no Ray, no weight bytes."""

from planning.errors import CheckpointError, ConfigError, ConversionError, MeshloadError, PlanError
from planning.plan import LoadPlan, ParamPlan, RankPlan, ReadItem
from planning.plan_json import plan_from_json, plan_to_json
from planning.planner import make_plan, resolve_model

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
    "make_plan",
    "plan_from_json",
    "plan_to_json",
    "resolve_model",
]
