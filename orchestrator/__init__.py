"""meshload's public API: plan and load a Hugging Face checkpoint over the nodes of a Ray cluster.

    import orchestrator
    plan = orchestrator.plan(model, tp=2, pp=1, nodes=2)           # pure: headers only, no cluster
    with orchestrator.load(model, tp=2, nodes=2) as m:             # Ray actors, one per rank
        m.report, m.full_state_dict(), m.logits(ids), m.generate(ids, max_new_tokens=8)
"""

from orchestrator.api import load, plan
from orchestrator.loaded_model import LoadedModel
from planning.errors import CheckpointError, ConfigError, ConversionError, MeshloadError, OptionError, PlanError
from planning.plan_json import plan_from_json, plan_to_json

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "LoadedModel",
    "MeshloadError",
    "OptionError",
    "PlanError",
    "load",
    "plan",
    "plan_from_json",
    "plan_to_json",
]
