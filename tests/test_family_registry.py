"""The family registry (``planning.families``): each family file adds to transformers' declarations and
retypes none of them; every entry names a real module of that family's model with a known style; the TP
runtime has an installer for every style's runtime. Unit tests: meta-device models, no Ray.

A new family file gets its checks here for free (they run over ``FAMILIES``); its own test loads it
(tests/test_families.py, tests/test_encoders.py, the model zoo).
"""

from __future__ import annotations

import pytest
import torch

from planning.families import BY_MODEL_TYPE, FAMILIES, family_of
from planning.families.family import Family
from planning.tp_plans import effective_plan, glob_regex
from planning.tp_styles import STYLES, style_rule

MODEL_TYPES = sorted(BY_MODEL_TYPE)


def _small_config(model_type: str):
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(config, attr):
            setattr(config, attr, 1)
    return config


def _meta_model(model_type: str, *, head: bool = False):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    config = _small_config(model_type)
    with torch.device("meta"):
        if not head:
            return AutoModel.from_config(config)
        for auto in (AutoModelForCausalLM, AutoModelForMaskedLM):
            try:
                return auto.from_config(config)
            except ValueError:
                continue
    raise AssertionError(f"{model_type}: no causal-LM or masked-LM head class")


def test_each_model_type_has_one_family_and_is_transformers():
    from transformers import CONFIG_MAPPING

    assert len(MODEL_TYPES) == sum(len(f.model_types) for f in FAMILIES)
    assert all(t in CONFIG_MAPPING for t in MODEL_TYPES), [t for t in MODEL_TYPES if t not in CONFIG_MAPPING]
    assert family_of("llama") is None  # transformers' declarations are used as they are
    with pytest.raises(ValueError, match="at least one model_type"):
        Family(model_types=())
    with pytest.raises(TypeError):
        FAMILIES[0].tp_plan["x"] = "colwise"  # frozen: a family cannot be changed by whoever reads it


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_entries_add_to_transformers_and_retype_nothing(model_type):
    from transformers import CONFIG_MAPPING

    declared = dict(getattr(CONFIG_MAPPING[model_type], "base_model_tp_plan", None) or {})
    family = family_of(model_type)
    same = sorted(k for k, v in family.tp_plan.items() if declared.get(k) == v)
    assert not same, f"{model_type}: entries that repeat transformers' base_model_tp_plan: {same}"
    for key, style in family.tp_plan.items():
        style_rule(style, where=key)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_entries_name_modules_of_the_model(model_type):
    family = family_of(model_type)
    base = _meta_model(model_type)
    modules = [name for name, _ in base.named_modules()]
    names = modules + [name for name, _ in base.named_parameters()]  # a key may name a parameter (fused experts)
    unmatched = sorted(k for k in family.tp_plan if not any(glob_regex(k).fullmatch(n) for n in names))
    assert not unmatched, f"{model_type}: plan keys matching no module or parameter of {type(base).__name__}: {unmatched}"
    leaves = {m.rpartition(".")[2] for m in modules}
    for names in (family.query_names, family.kv_names, family.fused_attention_names):
        assert names <= leaves, f"{model_type}: attention names not in the model: {sorted(names - leaves)}"
    attention = [mod for _, mod in base.named_modules() if any(hasattr(mod, a) for a in family.head_count_attrs)]
    assert attention or not family.head_count_attrs, f"{model_type}: no module has {family.head_count_attrs}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_effective_plan_holds_the_family_entries(model_type):
    family = family_of(model_type)
    model = _meta_model(model_type, head=True)
    plan = effective_plan(model)
    prefix = f"{model.base_model_prefix}." if getattr(model, model.base_model_prefix, model) is not model else ""
    for key, style in family.tp_plan.items():
        assert plan[prefix + key] == style
    for key, style in family.head_plans.get(type(model).__name__, {}).items():
        assert plan[key] == style


def test_the_runtime_has_an_installer_for_every_style():
    from workers.tp_runtime import RUNTIMES

    assert {rule.runtime for rule in STYLES.values()} == set(RUNTIMES)
