"""The TP plan of a model: transformers' declaration, meshload's plans for families without one, user overrides.

transformers declares a plan per family (``config.base_model_tp_plan`` plus the head model's
``_tp_plan``; the resolved ``model._tp_plan`` has full names). Some families declare none (GPT-2,
BERT), and some declare fused tensors as replicated-then-sliced (Phi-3's ``qkv_proj`` and
``gate_up_proj`` use ``colwise_gather_output``, which makes every rank hold the whole fused weight).
The family registry (``planning.families``, one module per family) fills those gaps: a family's
``tp_plan`` entries are relative to the base model, like transformers' ``base_model_tp_plan``; its
``head_plans`` add the head modules of specific classes.

A user ``tp_plan`` (glob → style, transformers spelling; ``*`` matches one name component) is merged
last and wins. Resolution maps every tensor to ``(style, matched key, param_level)``.

Pure; runs on the driver.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from planning.errors import PlanError
from planning.families import family_of
from planning.skeleton import Skeleton, TensorSpec
from planning.tp_styles import style_rule

def glob_regex(pattern: str) -> re.Pattern[str]:
    """transformers' plan spelling: ``*`` stands for one dotted component (usually a layer index)."""
    return re.compile(".".join("[^.]+" if part == "*" else re.escape(part) for part in pattern.split(".")))


def effective_plan(model, *, user_plan: dict[str, str] | None = None) -> dict[str, str]:
    """The full-name plan for ``model`` (a transformers module): declared, completed by ours, then the user's."""
    plan = dict(getattr(model, "_tp_plan", None) or {})
    model_type = model.config.model_type
    prefix = model.base_model_prefix
    is_head_model = prefix and hasattr(model, prefix) and getattr(model, prefix) is not model
    family = family_of(model_type)
    if family is not None:
        # Our family entries replace transformers' entries of the same keys (e.g. Phi-3's gather styles).
        base = f"{prefix}." if is_head_model else ""
        plan.update({f"{base}{k}": v for k, v in family.tp_plan.items()})
        plan.update(_head_entries(model, family.head_plans))
    if user_plan:
        for key, style in user_plan.items():
            style_rule(style, where=key)
        plan.update(user_plan)
    return plan


def _head_entries(model, head_plans: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    entries = dict(head_plans.get(type(model).__name__, {}))
    declared = dict(getattr(model, "_tp_plan", None) or {})
    if "lm_head" in declared:
        entries.setdefault("lm_head", declared["lm_head"])
    return entries


@dataclass(frozen=True, slots=True)
class StyleMatch:
    style: str
    key: str
    param_level: bool


class PlanMatcher:
    """Finds the style of each tensor: a key naming the parameter itself wins over one naming its module."""

    def __init__(self, plan: dict[str, str]) -> None:
        self.entries = [(key, style, glob_regex(key)) for key, style in plan.items()]

    def match(self, spec: TensorSpec) -> StyleMatch | None:
        best: tuple[int, int, StyleMatch] | None = None
        for key, style, regex in self.entries:
            if regex.fullmatch(spec.name):
                rank = (2, len(key))
            elif spec.module and regex.fullmatch(spec.module):
                rank = (1, len(key))
            else:
                continue
            if best is None or rank > best[:2]:
                best = (*rank, StyleMatch(style=style, key=key, param_level=rank[0] == 2))
        return None if best is None else best[2]

    def match_module(self, module_name: str) -> StyleMatch | None:
        """The entry naming this module itself (forward-time behaviour hangs on modules, not parameters)."""
        best: StyleMatch | None = None
        for key, style, regex in self.entries:
            if regex.fullmatch(module_name) and (best is None or len(key) > len(best.key)):
                best = StyleMatch(style=style, key=key, param_level=False)
        return best


def check_user_plan(user_plan: dict[str, str] | None, skeleton: Skeleton, module_names: list[str]) -> None:
    """A user plan key that matches no parameter or module is almost always a typo: say which."""
    if not user_plan:
        return
    names = [t.name for t in skeleton.tensors] + module_names
    bad = sorted(k for k in user_plan if not any(glob_regex(k).fullmatch(n) for n in names))
    if bad:
        raise PlanError(f"tp_plan keys match no parameter or module of {skeleton.class_name}: {bad}")
